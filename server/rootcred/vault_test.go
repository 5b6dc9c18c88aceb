package rootcred

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/vaultkv"
	"github.com/credbroker/credbroker/internal/vaultkv/kvtest"
	"github.com/credbroker/credbroker/server/config"
)

func writeSecretFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

func vaultConfig(s *kvtest.Server, path string) *config.Vault {
	return &config.Vault{
		Address: s.URL, Mount: s.Mount, Path: path, Key: config.DefaultVaultKey,
		RefreshInterval: config.DefaultRefreshInterval,
	}
}

// A secret with fields the broker does not use, one of them a number,
// reads (brokerd starts), and a rotation's writes keep them as they were.
func TestVaultSourceKeepsOtherFields(t *testing.T) {
	ctx := context.Background()
	s := kvtest.New(t, time.Hour)
	s.PutData("main", map[string]any{"password": "old", "port": 5432, "owner": "dba-team"})
	dir := t.TempDir()
	cfg := vaultConfig(s, "main")
	cfg.Auth, cfg.TokenFile = vaultkv.AuthToken, filepath.Join(dir, "token")
	writeSecretFile(t, cfg.TokenFile, s.RootToken)
	src, err := newVaultSource(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := src.read(ctx)
	if err != nil {
		t.Fatalf("read of a secret with a numeric field: %v", err)
	}
	if st.current != "old" || st.pending != "" {
		t.Fatalf("read = current %q, pending %q", st.current, st.pending)
	}
	staged, err := src.stage(ctx, st, "new")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := s.GetData("main")
	want := map[string]any{"password": "old", "password_pending": "new", "port": json.Number("5432"), "owner": "dba-team"}
	if !reflect.DeepEqual(data, want) {
		t.Errorf("after stage the secret is %#v, want %#v", data, want)
	}
	if err := src.commit(ctx, staged); err != nil {
		t.Fatal(err)
	}
	data, _ = s.GetData("main")
	want = map[string]any{"password": "new", "port": json.Number("5432"), "owner": "dba-team"}
	if !reflect.DeepEqual(data, want) {
		t.Errorf("after commit the secret is %#v, want %#v", data, want)
	}

	// The fields the broker does use must be strings; the error names the
	// field, not the value.
	s.PutData("main", map[string]any{"password": 12345678})
	if _, err := src.read(ctx); err == nil || !strings.Contains(err.Error(), `field "password" is not a string`) || strings.Contains(err.Error(), "12345678") {
		t.Errorf("read of a numeric password: %v", err)
	}
}

// token_file is read again when Vault refuses the token: a token that Vault
// Agent rewrote on disk is used without a restart.
func TestVaultSourceRereadsTokenFile(t *testing.T) {
	ctx := context.Background()
	s := kvtest.New(t, time.Hour)
	s.Put("main", map[string]string{"password": "pw"})
	cfg := vaultConfig(s, "main")
	cfg.Auth, cfg.TokenFile = vaultkv.AuthToken, filepath.Join(t.TempDir(), "token")
	writeSecretFile(t, cfg.TokenFile, s.RootToken)
	src, err := newVaultSource(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.RevokeTokens()
	next := s.NewToken()
	writeSecretFile(t, cfg.TokenFile, next)
	if st, err := src.read(ctx); err != nil || st.current != "pw" {
		t.Fatalf("read after the token file changed: %q, %v", st.current, err)
	}
	if s.TokenUses(next) == 0 {
		t.Error("the new token was not used")
	}
}

// secret_id_file is read again at each AppRole login: a new secret id
// written after the first was used up is the one the next login uses.
func TestVaultSourceRereadsSecretIDFile(t *testing.T) {
	ctx := context.Background()
	s := kvtest.NewServer(t, kvtest.Options{TokenTTL: time.Hour, SecretIDUses: 1})
	s.Put("main", map[string]string{"password": "pw"})
	cfg := vaultConfig(s, "main")
	cfg.Auth, cfg.RoleID, cfg.SecretIDFile = vaultkv.AuthAppRole, s.RoleID, filepath.Join(t.TempDir(), "secret-id")
	writeSecretFile(t, cfg.SecretIDFile, s.SecretID)
	src, err := newVaultSource(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	writeSecretFile(t, cfg.SecretIDFile, s.NewSecretID(0))
	s.RevokeTokens()
	if st, err := src.read(ctx); err != nil || st.current != "pw" {
		t.Fatalf("read after the token was revoked: %q, %v", st.current, err)
	}
	if n := s.Logins(); n != 2 {
		t.Errorf("%d logins, want 2", n)
	}
}
