package config

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/store"
)

const testPassword = "s3cret-Admin-pw"

// writeConfig lays out a config directory: a 0600 password file and the
// YAML, with relative paths so the test also covers their resolution.
func writeConfig(t *testing.T, yamlText string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.password"), []byte(testPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "credbroker.yaml")
	if err := os.WriteFile(path, []byte(yamlText), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

const validYAML = `
listen: 127.0.0.1:7450
store:
  path: leases.db
targets:
  - name: main
    url: postgres://broker_admin@127.0.0.1:5432/app
    password_file: main.password
roles:
  - name: read_only
    target: main
    proxy_role: read_only_role
    default_ttl: 15m
    max_ttl: 1h
  - name: admin
    target: main
    proxy_role: admin_role
    default_ttl: 5m
    max_ttl: 15m
`

func loadAndValidate(t *testing.T, yamlText string) (*Config, error) {
	t.Helper()
	f, err := Load(writeConfig(t, yamlText))
	if err != nil {
		return nil, err
	}
	return f.Validate()
}

func TestValidMinimalConfigGetsDefaults(t *testing.T) {
	path := writeConfig(t, validYAML)
	f, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := f.Validate()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(path)
	if c.Store.Path != filepath.Join(dir, "leases.db") {
		t.Errorf("store path %q not resolved against the config's directory %q", c.Store.Path, dir)
	}
	tg := c.Targets[0]
	if tg.Database != "app" || tg.AdminUser != "broker_admin" {
		t.Errorf("database %q admin %q", tg.Database, tg.AdminUser)
	}
	if tg.MarkerRole != postgres.DefaultMarkerRole || tg.MaxConns != postgres.DefaultMaxConns || tg.ConnectTimeout != postgres.DefaultConnectTimeout || tg.ScramIterations != postgres.DefaultScramIterations {
		t.Errorf("target defaults not filled: %+v", tg)
	}
	if tg.PasswordSource != "file "+filepath.Join(dir, "main.password") {
		t.Errorf("password source %q", tg.PasswordSource)
	}
	want := []broker.Role{
		{Name: "read_only", Target: "main", ProxyRole: "read_only_role", DefaultTTL: 15 * time.Minute, MaxTTL: time.Hour},
		{Name: "admin", Target: "main", ProxyRole: "admin_role", DefaultTTL: 5 * time.Minute, MaxTTL: 15 * time.Minute},
	}
	if fmt.Sprint(c.Roles) != fmt.Sprint(want) {
		t.Errorf("roles = %+v, want %+v", c.Roles, want)
	}
	if c.Store.TombstoneRetention != 24*time.Hour || c.Store.OpenTimeout != store.DefaultTimeout {
		t.Errorf("store defaults: %+v", c.Store)
	}
	wantExpiry := Expiry{
		RevokeConcurrency: 4, RevokeRate: 1000, RevokeRetries: 5, ValidUntilGrace: time.Minute,
		RetryBaseDelay: time.Second, RetryMaxDelay: time.Minute, FailedRetryInterval: 10 * time.Minute,
	}
	if c.Expiry != wantExpiry {
		t.Errorf("expiry = %+v, want %+v", c.Expiry, wantExpiry)
	}
	if c.ReconcileInterval != 5*time.Minute || c.DisconnectGrace != 30*time.Second || c.ShutdownTimeout != 15*time.Second {
		t.Errorf("intervals: %v %v %v", c.ReconcileInterval, c.DisconnectGrace, c.ShutdownTimeout)
	}
	if c.Log.Level != slog.LevelInfo || c.Log.Format != "text" || c.DSNSSLMode != "prefer" {
		t.Errorf("log %+v sslmode %q", c.Log, c.DSNSSLMode)
	}
	if len(c.Warnings) != 0 {
		t.Errorf("warnings: %q", c.Warnings)
	}
}

func TestEveryKeySet(t *testing.T) {
	t.Setenv("CB_TEST_PW", "from-env")
	c, err := loadAndValidate(t, `
listen: unix:/run/credbroker.sock
store:
  path: leases.db
  open_timeout: 2s
  tombstone_retention: 72h
targets:
  - name: main
    url: postgresql://broker_admin@db.internal:5433/app?sslmode=verify-full
    password_env: CB_TEST_PW
    marker_role: cb_marker
    max_conns: 3
    connect_timeout: 3s
    scram_iterations: 1
roles:
  - {name: read_only, target: main, proxy_role: read_only_role, default_ttl: 1m, max_ttl: 2m}
expiry:
  revoke_concurrency: 2
  revoke_rate: 0.5
  revoke_retries: 9
  valid_until_grace: 30s
  retry_base_delay: 2s
  retry_max_delay: 20s
  failed_retry_interval: 1h
reconcile_interval: 1m
disconnect_grace: 10s
shutdown_timeout: 5s
log:
  level: debug
  format: json
dsn_sslmode: verify-full
`)
	if err != nil {
		t.Fatal(err)
	}
	tg := c.Targets[0]
	if tg.PasswordSource != "env CB_TEST_PW" || tg.MarkerRole != "cb_marker" || tg.MaxConns != 3 || tg.ConnectTimeout != 3*time.Second || tg.ScramIterations != 1 {
		t.Errorf("target: %+v", tg)
	}
	if c.Listen != "unix:/run/credbroker.sock" || c.Store.OpenTimeout != 2*time.Second || c.Store.TombstoneRetention != 72*time.Hour {
		t.Errorf("listen/store: %q %+v", c.Listen, c.Store)
	}
	want := Expiry{RevokeConcurrency: 2, RevokeRate: 0.5, RevokeRetries: 9, ValidUntilGrace: 30 * time.Second,
		RetryBaseDelay: 2 * time.Second, RetryMaxDelay: 20 * time.Second, FailedRetryInterval: time.Hour}
	if c.Expiry != want {
		t.Errorf("expiry = %+v", c.Expiry)
	}
	if c.ReconcileInterval != time.Minute || c.DisconnectGrace != 10*time.Second || c.ShutdownTimeout != 5*time.Second {
		t.Errorf("intervals")
	}
	if c.Log.Level != slog.LevelDebug || c.Log.Format != "json" || c.DSNSSLMode != "verify-full" {
		t.Errorf("log/sslmode: %+v %q", c.Log, c.DSNSSLMode)
	}
}

// TestErrors: each case breaks the valid file in one way (or several) and
// lists the messages it must produce. Every message starts with its key
// path.
func TestErrors(t *testing.T) {
	tests := []struct {
		name    string
		yaml    string
		env     map[string]string
		want    []string
		notWant []string
	}{
		{
			name: "default above max",
			yaml: strings.Replace(validYAML, "default_ttl: 5m", "default_ttl: 2h", 1),
			want: []string{"roles[1].default_ttl: 2h exceeds max_ttl 15m"},
		},
		{
			name: "unknown target",
			yaml: strings.Replace(validYAML, "target: main\n    proxy_role: admin_role", "target: x\n    proxy_role: admin_role", 1),
			want: []string{`roles[1].target: unknown target "x"`},
		},
		{
			name:    "password in url",
			yaml:    strings.Replace(validYAML, "broker_admin@", "broker_admin:hunter2@", 1),
			want:    []string{"targets[0].url: must not contain a password; use password_file or password_env"},
			notWant: []string{"hunter2"},
		},
		{
			name:    "password in url query",
			yaml:    strings.Replace(validYAML, "5432/app", "5432/app?password=hunter2", 1),
			want:    []string{"targets[0].url: must not contain a password"},
			notWant: []string{"hunter2"},
		},
		{
			name:    "unparsable url with password",
			yaml:    strings.Replace(validYAML, "broker_admin@127.0.0.1:5432", "broker_admin:hun%zzter2@127.0.0.1:5432", 1),
			want:    []string{"targets[0].url: not a valid URL"},
			notWant: []string{"hun", "zz"},
		},
		{
			name: "url without database, user or host",
			yaml: strings.Replace(validYAML, "postgres://broker_admin@127.0.0.1:5432/app", "postgres:///", 1),
			want: []string{"targets[0].url: must name the admin user", "targets[0].url: must name a host", "targets[0].url: must name the database"},
		},
		{
			name: "url with another scheme",
			yaml: strings.Replace(validYAML, "postgres://", "mysql://", 1),
			want: []string{`targets[0].url: scheme must be postgres:// or postgresql://, not "mysql"`},
		},
		{
			name: "bad identifiers",
			yaml: strings.NewReplacer(
				"proxy_role: read_only_role", `proxy_role: "read_only; DROP TABLE x"`,
				"name: admin\n", "name: Admin-Role\n",
				"/app", "/pg_app",
			).Replace(validYAML),
			want: []string{"roles[0].proxy_role:", "roles[1].name: \"Admin-Role\" must match", "targets[0].url: database:"},
		},
		{
			name: "role name too long for a username",
			yaml: strings.Replace(validYAML, "name: admin\n", "name: "+strings.Repeat("a", 41)+"\n", 1),
			want: []string{"roles[1].name:"},
		},
		{
			name: "duplicate names",
			yaml: strings.Replace(validYAML, "name: admin\n", "name: read_only\n", 1) + `
  - name: other
    target: main
    proxy_role: other_role
    default_ttl: 1m
    max_ttl: 1m
`,
			want: []string{`roles[1].name: "read_only" is also roles[0].name`},
		},
		{
			name: "duplicate target",
			yaml: strings.Replace(validYAML, "roles:", `  - name: main
    url: postgres://broker_admin@127.0.0.1:5432/app
    password_file: main.password
roles:`, 1),
			want: []string{`targets[1].name: "main" is also targets[0].name`},
		},
		{
			name: "missing password source",
			yaml: strings.Replace(validYAML, "    password_file: main.password\n", "", 1),
			want: []string{"targets[0]: no admin password: set password_file"},
		},
		{
			name: "both password sources",
			yaml: strings.Replace(validYAML, "    password_file: main.password\n", "    password_file: main.password\n    password_env: X\n", 1),
			want: []string{"targets[0]: set one of password_file, password_env and vault, not several"},
		},
		{
			name: "ttl zero, negative, missing, malformed",
			yaml: strings.NewReplacer(
				"default_ttl: 15m", "default_ttl: 0s",
				"max_ttl: 1h", "max_ttl: -1h",
				"    default_ttl: 5m\n", "",
				"max_ttl: 15m", "max_ttl: 1d",
			).Replace(validYAML),
			want: []string{
				"roles[0].default_ttl: 0s must be positive",
				"roles[0].max_ttl: -1h must be positive",
				"roles[1].default_ttl: required",
				`roles[1].max_ttl: "1d" is not a duration`, "days are written in hours",
			},
		},
		{
			name: "unitless duration",
			yaml: strings.Replace(validYAML, "default_ttl: 15m", "default_ttl: 15", 1),
			want: []string{`roles[0].default_ttl: "15" is not a duration`},
		},
		{
			name: "typo'd key",
			yaml: strings.Replace(validYAML, "password_file:", "pasword_file:", 1),
			want: []string{`targets[0].pasword_file: unknown key (line 8); did you mean "password_file"?`},
		},
		{
			name: "unknown top-level key and wrong shapes",
			yaml: validYAML + "tsl: {}\nexpiry:\n  revoke_rate: fast\n  revoke_retries: [1]\nlog: debug\n",
			want: []string{
				`tsl: unknown key (line 20); did you mean "tls"?`,
				`expiry.revoke_rate: "fast" is not a number`,
				"expiry.revoke_retries: must be a single value, not a list",
				`log: must be a mapping of keys, not the value "debug"`,
			},
		},
		{
			name: "key given twice",
			yaml: validYAML + "listen: 127.0.0.1:1\n",
			want: []string{"listen: given twice (lines 2 and 20)"},
		},
		{
			name: "targets not a list",
			yaml: "targets:\n  name: main\n",
			want: []string{"targets: must be a list, not a mapping"},
		},
		{
			name: "nothing configured",
			yaml: "listen: 127.0.0.1:7450\n",
			want: []string{"store.path: required", "targets: at least one target is required", "roles: at least one role is required"},
		},
		{
			name: "non-loopback listen",
			yaml: strings.Replace(validYAML, "127.0.0.1:7450", "0.0.0.0:7450", 1),
			want: []string{"listen 0.0.0.0:7450: plaintext gRPC is only allowed on loopback or a unix socket; configure tls (cert_file, key_file) or listen on 127.0.0.1"},
		},
		{
			name: "positive numbers",
			yaml: validYAML + "expiry:\n  revoke_concurrency: 0\n  revoke_rate: -1\n  revoke_retries: 0\n  retry_base_delay: 2m\n",
			want: []string{
				"expiry.revoke_concurrency: 0 must be positive",
				"expiry.revoke_rate: -1 must be positive",
				"expiry.revoke_retries: 0 must be positive",
				"expiry.retry_base_delay: 2m0s exceeds expiry.retry_max_delay 1m0s",
			},
		},
		{
			name: "scram_iterations out of range",
			yaml: strings.Replace(validYAML, "password_file: main.password", "password_file: main.password\n    scram_iterations: 0", 1),
			want: []string{"targets[0].scram_iterations: 0 is outside 1..10000000"},
		},
		{
			name: "scram_iterations too many",
			yaml: strings.Replace(validYAML, "password_file: main.password", "password_file: main.password\n    scram_iterations: 10000001", 1),
			want: []string{"targets[0].scram_iterations: 10000001 is outside 1..10000000"},
		},
		{
			name: "max_conns zero",
			yaml: strings.Replace(validYAML, "password_file: main.password", "password_file: main.password\n    max_conns: 0", 1),
			want: []string{"targets[0].max_conns: 0 must be positive"},
		},
		{
			name: "log and sslmode",
			yaml: validYAML + "log:\n  level: loud\n  format: xml\ndsn_sslmode: maybe\n",
			want: []string{`log.level: "loud" is not a level`, `log.format: "xml" is not a format`, `dsn_sslmode: "maybe" is not an sslmode`},
		},
		{
			name: "proxy role is marker or admin",
			yaml: strings.NewReplacer("proxy_role: read_only_role", "proxy_role: credbroker_managed", "proxy_role: admin_role", "proxy_role: broker_admin").Replace(validYAML),
			want: []string{
				`roles[0].proxy_role: "credbroker_managed" is the marker role of target "main"`,
				`roles[1].proxy_role: "broker_admin" is the admin user of target "main"`,
			},
		},
		{
			name: "store path under a file",
			yaml: strings.Replace(validYAML, "path: leases.db", "path: main.password/leases.db", 1),
			want: []string{"store.path: ", "main.password is not a directory"},
		},
		{
			name: "empty file",
			yaml: "# nothing\n",
			want: []string{"the file is empty"},
		},
		{
			name: "two documents",
			yaml: validYAML + "---\nlisten: 127.0.0.1:1\n",
			want: []string{"more than one YAML document"},
		},
		{
			name: "yaml syntax",
			yaml: "listen: [\n",
			want: []string{"yaml:"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := loadAndValidate(t, tc.yaml)
			if err == nil {
				t.Fatalf("no error; want %q", tc.want)
			}
			msg := err.Error()
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error does not contain %q:\n%s", w, msg)
				}
			}
			for _, nw := range append(tc.notWant, testPassword) {
				if strings.Contains(msg, nw) {
					t.Errorf("error contains %q:\n%s", nw, msg)
				}
			}
		})
	}
}

// TestAllErrorsCollected: one file with many problems reports each of them.
func TestAllErrorsCollected(t *testing.T) {
	_, err := loadAndValidate(t, `
store:
  path: leases.db
targets:
  - name: main
    url: postgres://broker_admin:pw@h/app
roles:
  - {name: a, target: x, proxy_role: r, default_ttl: 2h, max_ttl: 1h}
  - {name: a, target: main, proxy_role: "pg_signal_backend", default_ttl: -1s, max_ttl: 1h}
`)
	if err == nil {
		t.Fatal("no error")
	}
	lines := strings.Split(err.Error(), "\n")
	for _, prefix := range []string{
		"targets[0].url:", "targets[0]: no admin password", "roles[0].target:", "roles[0].default_ttl: 2h exceeds",
		"roles[1].name:", "roles[1].proxy_role:", "roles[1].default_ttl:",
	} {
		found := false
		for _, l := range lines {
			found = found || strings.HasPrefix(l, prefix)
		}
		if !found {
			t.Errorf("no line starts with %q:\n%s", prefix, err)
		}
	}
}

// TestUnknownKeyHidesNothing: a file with unknown keys, a key given twice
// and a value of the wrong kind reports those and every other problem of
// the file, all together.
func TestUnknownKeyHidesNothing(t *testing.T) {
	_, err := loadAndValidate(t, `
listen: 0.0.0.0:1
lisen: 127.0.0.1:1
store:
  path: leases.db
  open_timeout: forever
targets:
  - name: Main
    url: postgres://broker_admin:pw@h/app
    max_conns: ten
    colour: blue
roles:
  - {name: a, target: x, proxy_role: r, default_ttl: 2h, max_ttl: 1h}
  - {name: a, target: main, proxy_role: "pg_signal_backend", default_ttl: -1s, max_ttl: 1h}
  - {name: c, name: d, target: main, proxy_role: r, default_ttl: 1m, max_ttl: 1h}
expiry: {revoke_rate: 0, retry_base_delay: 5m}
log: {level: loud}
dsn_sslmode: sometimes
`)
	if err == nil {
		t.Fatal("no error")
	}
	lines := strings.Split(err.Error(), "\n")
	for _, prefix := range []string{
		"lisen: unknown key", "targets[0].colour: unknown key", "targets[0].max_conns: \"ten\" is not an integer",
		"roles[2].name: given twice", "roles[1].name:",
		"listen 0.0.0.0:1:", "store.open_timeout:", "targets[0].name:", "targets[0].url:", "targets[0]: no admin password",
		"roles[0].target:", "roles[0].default_ttl: 2h exceeds", "roles[1].proxy_role:", "roles[1].default_ttl:",
		"expiry.revoke_rate:", "expiry.retry_base_delay:", "log.level:", "dsn_sslmode:",
	} {
		found := false
		for _, l := range lines {
			found = found || strings.HasPrefix(l, prefix)
		}
		if !found {
			t.Errorf("no line starts with %q:\n%s", prefix, err)
		}
	}
	// A value of the wrong kind is reported once, not again as the
	// validation error it causes ("must be positive").
	if n := strings.Count(err.Error(), "targets[0].max_conns"); n != 1 {
		t.Errorf("targets[0].max_conns reported %d times:\n%s", n, err)
	}
}

func TestWarnings(t *testing.T) {
	c, err := loadAndValidate(t, validYAML+`  - name: also_read
    target: main
    proxy_role: read_only_role
    default_ttl: 1m
    max_ttl: 1m
`)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Warnings) != 1 || !strings.HasPrefix(c.Warnings[0], `roles[2].proxy_role: "read_only_role" on target "main" is also the proxy role of roles[0]`) {
		t.Errorf("warnings = %q", c.Warnings)
	}

	c, err = loadAndValidate(t, strings.Replace(validYAML, "roles:", `  - name: spare
    url: postgres://broker_admin@127.0.0.2/app
    password_file: main.password
roles:`, 1))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Warnings) != 1 || c.Warnings[0] != `targets[1]: target "spare" is used by no role` {
		t.Errorf("warnings = %q", c.Warnings)
	}
}

func TestParseListen(t *testing.T) {
	tests := []struct {
		addr, network, address, err string
	}{
		{addr: "127.0.0.1:7450", network: "tcp", address: "127.0.0.1:7450"},
		{addr: "127.1.2.3:0", network: "tcp", address: "127.1.2.3:0"},
		{addr: "[::1]:7450", network: "tcp", address: "[::1]:7450"},
		{addr: "localhost:7450", network: "tcp", address: "localhost:7450"},
		{addr: "unix:/run/cb.sock", network: "unix", address: "/run/cb.sock"},
		{addr: "unix:///run/cb.sock", network: "unix", address: "/run/cb.sock"},
		{addr: "unix:cb.sock", network: "unix", address: "cb.sock"},
		{addr: "unix:", err: "needs a path"},
		{addr: "0.0.0.0:7450", err: "listen 0.0.0.0:7450: plaintext gRPC is only allowed on loopback or a unix socket; configure tls (cert_file, key_file) or listen on 127.0.0.1"},
		{addr: ":7450", err: "plaintext gRPC is only allowed on loopback"},
		{addr: "10.0.0.1:7450", err: "plaintext gRPC is only allowed on loopback"},
		{addr: "[::]:7450", err: "plaintext gRPC is only allowed on loopback"},
		{addr: "broker.example.com:7450", err: "plaintext gRPC is only allowed on loopback"},
		{addr: "127.0.0.1", err: "want host:port or unix:/path"},
		{addr: "127.0.0.1:http", err: `"http" is not a port`},
		{addr: "127.0.0.1:70000", err: `"70000" is not a port`},
	}
	for _, tc := range tests {
		t.Run(tc.addr, func(t *testing.T) {
			network, address, err := ParseListen(tc.addr)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || network != tc.network || address != tc.address {
				t.Fatalf("= %q %q %v, want %q %q", network, address, err, tc.network, tc.address)
			}
		})
	}
}

// TestSecretNeverPrints: a Config formatted or encoded every common way
// shows no password: Validate reads none (package rootcred does, where it
// is used), so there is none in it to show.
func TestSecretNeverPrints(t *testing.T) {
	c, err := loadAndValidate(t, validYAML)
	if err != nil {
		t.Fatal(err)
	}
	var outs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X"} {
		outs = append(outs, fmt.Sprintf(verb, c), fmt.Sprintf(verb, c.Targets[0]))
	}
	js, _ := json.Marshal(c)
	outs = append(outs, string(js))
	var sb strings.Builder
	slog.New(slog.NewTextHandler(&sb, nil)).Info("cfg", "target", c.Targets[0])
	slog.New(slog.NewJSONHandler(&sb, nil)).Info("cfg", "target", c.Targets[0])
	outs = append(outs, sb.String())
	for _, o := range outs {
		if strings.Contains(o, testPassword) || strings.Contains(o, fmt.Sprintf("%x", testPassword)) {
			t.Errorf("password printed: %s", o)
		}
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("err = %v", err)
	}
}

func TestVaultConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		vault string
		want  string
	}{
		{`{path: x, auth: token, token_env: VT}`, "targets[0].vault.address: required"},
		{`{address: "ftp://v", path: x, auth: token, token_env: VT}`, "targets[0].vault.address: not an http(s) URL"},
		{`{address: "https://v", auth: token, token_env: VT}`, "targets[0].vault.path: required"},
		{`{address: "https://v", path: x, auth: ldap}`, `targets[0].vault.auth: "ldap" is not an auth method`},
		{`{address: "https://v", path: x, auth: token}`, "targets[0].vault: auth needs token_file or token_env"},
		{`{address: "https://v", path: x, auth: approle, secret_id_env: VT}`, "targets[0].vault.role_id: required"},
		{`{address: "https://v", path: x, key: pw_pending, auth: token, token_env: VT}`, "targets[0].vault.key"},
		{`{address: "https://v", path: x, auth: token, token_env: VT, refresh_interval: 0s}`, "targets[0].vault.refresh_interval"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			t.Setenv("VT", "hvs.token")
			f, err := Parse([]byte("store: {path: /tmp/x.db}\ntargets:\n  - {name: main, url: \"postgres://a@h/d\", vault: " + tc.vault + "}\n" +
				"roles:\n  - {name: r, target: main, proxy_role: p, default_ttl: 1m, max_ttl: 5m}\n"))
			if err != nil {
				t.Fatal(err)
			}
			_, err = f.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate: %v, want %q", err, tc.want)
			}
		})
	}
	// Two sources at once.
	f, err := Parse([]byte("store: {path: /tmp/x.db}\ntargets:\n  - {name: main, url: \"postgres://a@h/d\", password_env: VT, vault: {address: \"https://v\", path: x, auth: token, token_env: VT}}\n" +
		"roles:\n  - {name: r, target: main, proxy_role: p, default_ttl: 1m, max_ttl: 5m}\n"))
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VT", "hvs.token")
	if _, err := f.Validate(); err == nil || !strings.Contains(err.Error(), "not several") {
		t.Fatalf("Validate with two sources: %v", err)
	}
}
