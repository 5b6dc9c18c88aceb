package rootcred

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/credbroker/credbroker/server/config"
)

const checkYAML = `
store: {path: leases.db}
targets:
  - name: main
    url: postgres://broker_admin@127.0.0.1:5432/app
    password_file: main.password
roles:
  - {name: read_only, target: main, proxy_role: read_only_role, default_ttl: 15m, max_ttl: 1h}
`

// checkConfig writes yamlText beside a 0600 password file holding
// password, validates it, and runs Check.
func checkConfig(t *testing.T, yamlText, password string) (warnings []string, dir string, err error) {
	t.Helper()
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.password"), []byte(password), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "credbroker.yaml")
	if err := os.WriteFile(path, []byte(yamlText), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.Validate()
	if err != nil {
		t.Fatal(err)
	}
	warnings, err = Check(cfg)
	return warnings, dir, err
}

func TestCheckPasswordSources(t *testing.T) {
	for _, tc := range []struct {
		name string
		yaml string
		env  map[string]string
		want string
	}{
		{"password file missing", strings.Replace(checkYAML, "password_file: main.password", "password_file: nope.password", 1),
			nil, "targets[0].password_file: stat "},
		{"password env unset", strings.Replace(checkYAML, "password_file: main.password", "password_env: CB_TEST_UNSET_VARIABLE", 1),
			nil, "targets[0].password_env: environment variable CB_TEST_UNSET_VARIABLE is not set"},
		{"password env empty", strings.Replace(checkYAML, "password_file: main.password", "password_env: CB_TEST_EMPTY", 1),
			map[string]string{"CB_TEST_EMPTY": ""}, "targets[0].password_env: environment variable CB_TEST_EMPTY is empty"},
		{"vault token file missing", strings.Replace(checkYAML, "password_file: main.password",
			`vault: {address: "https://v", path: x, auth: token, token_file: nope.token}`, 1),
			nil, "targets[0].vault.token_file: stat "},
		{"audit key too short", checkYAML + "audit: {path: audit.log, hmac_key_file: main.password}\n",
			nil, "audit.hmac_key_file: the key is 2 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, _, err := checkConfig(t, tc.yaml, "pw\n")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Check: %v, want %q", err, tc.want)
			}
		})
	}
}

func TestPasswordFileModes(t *testing.T) {
	tests := []struct {
		mode        os.FileMode
		content     string
		wantErr     string
		wantWarning string
	}{
		{mode: 0o600, content: "pw\n"},
		{mode: 0o400, content: "pw"},
		{mode: 0o640, content: "pw\r\n"},
		{mode: 0o644, content: "pw\n", wantWarning: "is world-readable (mode 0644); run chmod 600"},
		{mode: 0o620, content: "pw", wantErr: "is group- or world-writable (mode 0620)"},
		{mode: 0o602, content: "pw", wantErr: "is group- or world-writable (mode 0602)"},
		{mode: 0o600, content: "\n", wantErr: "is empty"},
		{mode: 0o600, content: "pw\nsecond", wantErr: "holds more than one line"},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%04o_%q", tc.mode, tc.content), func(t *testing.T) {
			dir := t.TempDir()
			pwPath := filepath.Join(dir, "main.password")
			if err := os.WriteFile(pwPath, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(pwPath, tc.mode); err != nil { // WriteFile's mode is masked by umask
				t.Fatal(err)
			}
			cfg := &config.Config{Targets: []config.Target{{Name: "main", PasswordFile: pwPath}}}
			warnings, err := Check(cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), "targets[0].password_file: ") || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "pw") && !strings.Contains(err.Error(), ".password") {
					t.Errorf("error echoes the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s, _, err := ReadSecretFile(pwPath); err != nil || s.Reveal() != "pw" {
				t.Errorf("ReadSecretFile = %q, %v; want pw (final newline trimmed)", s.Reveal(), err)
			}
			if tc.wantWarning == "" && len(warnings) > 0 {
				t.Errorf("unexpected warnings %q", warnings)
			}
			if tc.wantWarning != "" && (len(warnings) != 1 || !strings.Contains(warnings[0], tc.wantWarning) || !strings.HasPrefix(warnings[0], "targets[0].password_file: ")) {
				t.Errorf("warnings = %q, want %q", warnings, tc.wantWarning)
			}
		})
	}
}

// TestSecretNeverPrints: a Secret formatted or encoded every common way
// shows no password.
func TestSecretNeverPrints(t *testing.T) {
	const pw = "s3cret-Admin-pw"
	s := Secret(pw)
	var outs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X"} {
		outs = append(outs, fmt.Sprintf(verb, s), fmt.Sprintf(verb, struct{ P Secret }{s}))
	}
	js, _ := json.Marshal(struct{ P Secret }{s})
	var sb strings.Builder
	slog.New(slog.NewTextHandler(&sb, nil)).Info("x", "pw", s)
	slog.New(slog.NewJSONHandler(&sb, nil)).Info("x", "pw", s)
	outs = append(outs, string(js), sb.String())
	for _, o := range outs {
		if strings.Contains(o, pw) || strings.Contains(o, fmt.Sprintf("%x", pw)) {
			t.Errorf("password printed: %s", o)
		}
	}
}
