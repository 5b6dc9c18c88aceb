package vaultkv_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/vaultkv"
	"github.com/credbroker/credbroker/internal/vaultkv/kvtest"
)

func randomPath() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return "credbroker-test/" + hex.EncodeToString(b)
}

// server returns the Vault the test talks to: a real one when VAULT_ADDR
// and VAULT_TOKEN are set (KV v2 mounted at "secret", as `vault server
// -dev` has it), else the in-process stand-in.
func server(t *testing.T) vaultkv.Config {
	t.Helper()
	if addr := os.Getenv("VAULT_ADDR"); addr != "" {
		tok := os.Getenv("VAULT_TOKEN")
		if tok == "" {
			t.Fatal("VAULT_ADDR is set but VAULT_TOKEN is not")
		}
		return vaultkv.Config{Address: addr, Mount: "secret", Path: randomPath(), Auth: vaultkv.AuthToken, Token: tok}
	}
	s := kvtest.New(t, time.Hour)
	return vaultkv.Config{Address: s.URL, Mount: s.Mount, Path: randomPath(), Auth: vaultkv.AuthToken, Token: s.RootToken}
}

func TestReadWriteCheckAndSet(t *testing.T) {
	ctx := context.Background()
	cfg := server(t)
	c, err := vaultkv.New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if _, err := c.Read(ctx); err == nil {
		t.Fatal("Read of a missing secret succeeded")
	}
	v1, err := c.Write(ctx, map[string]any{"password": "first", "other": "kept"}, 0)
	if err != nil {
		t.Fatalf("Write: %v", err)
	}
	got, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	if got.Version != v1 || got.Data["password"] != "first" || got.Data["other"] != "kept" {
		t.Fatalf("Read = %+v, want version %d with the written data", got, v1)
	}
	// A write based on an old version loses: someone changed the secret.
	if _, err := c.Write(ctx, map[string]any{"password": "second"}, v1); err != nil {
		t.Fatalf("Write with cas %d: %v", v1, err)
	}
	if _, err := c.Write(ctx, map[string]any{"password": "stale"}, v1); !errors.Is(err, vaultkv.ErrVersionConflict) {
		t.Fatalf("Write with an old cas: %v, want ErrVersionConflict", err)
	}
	if got, _ := c.Read(ctx); got.Data["password"] != "second" {
		t.Fatalf("after the conflict the secret is %q", got.Data["password"])
	}
}

func TestAuth(t *testing.T) {
	ctx := context.Background()
	s := kvtest.New(t, time.Hour)
	base := vaultkv.Config{Address: s.URL, Mount: s.Mount, Path: "x"}
	s.Put("x", map[string]string{"password": "pw"})
	for _, tc := range []struct {
		name string
		cfg  func(c vaultkv.Config) vaultkv.Config
		ok   bool
	}{
		{"token", func(c vaultkv.Config) vaultkv.Config { c.Auth, c.Token = vaultkv.AuthToken, s.RootToken; return c }, true},
		{"bad token", func(c vaultkv.Config) vaultkv.Config {
			c.Auth, c.Token = vaultkv.AuthToken, "hvs.bad-token-value"
			return c
		}, false},
		{"approle", func(c vaultkv.Config) vaultkv.Config {
			c.Auth, c.RoleID, c.SecretID = vaultkv.AuthAppRole, s.RoleID, s.SecretID
			return c
		}, true},
		{"bad secret id", func(c vaultkv.Config) vaultkv.Config {
			c.Auth, c.RoleID, c.SecretID = vaultkv.AuthAppRole, s.RoleID, "wrong-secret-id-value"
			return c
		}, false},
		{"unknown method", func(c vaultkv.Config) vaultkv.Config { c.Auth = "ldap"; return c }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg(base)
			c, err := vaultkv.New(ctx, cfg)
			if !tc.ok {
				if err == nil {
					t.Fatal("New succeeded")
				}
				for _, secret := range []string{cfg.Token, cfg.SecretID} {
					if secret != "" && strings.Contains(err.Error(), secret) {
						t.Errorf("error %q holds a credential", err)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			got, err := c.Read(ctx)
			if err != nil || got.Data["password"] != "pw" {
				t.Fatalf("Read = %+v, %v", got, err)
			}
		})
	}
}

// A secret holds fields the broker does not use, of any JSON type (a DBA
// writes port: 5432 as a number). Reading it works, and writing back what
// was read keeps every field with its type: a number stays a number.
func TestNonStringFields(t *testing.T) {
	ctx := context.Background()
	s := kvtest.New(t, time.Hour)
	s.PutData("x", map[string]any{
		"password": "pw", "port": 5432, "tls": true, "hosts": []any{"a", "b"}, "extra": map[string]any{"n": 1.5},
	})
	c, err := vaultkv.New(ctx, vaultkv.Config{Address: s.URL, Mount: s.Mount, Path: "x", Auth: vaultkv.AuthToken, Token: s.RootToken})
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("Read of a secret with a numeric field: %v", err)
	}
	if pw, err := got.String("password"); err != nil || pw != "pw" {
		t.Fatalf("String(password) = %q, %v", pw, err)
	}
	if _, err := got.String("port"); err == nil || strings.Contains(err.Error(), "5432") {
		t.Errorf("String(port) of a number: %v, want an error that does not quote the value", err)
	}
	if v, err := got.String("absent"); v != "" || err != nil {
		t.Errorf("String(absent) = %q, %v", v, err)
	}
	got.Data["password"] = "next"
	if _, err := c.Write(ctx, got.Data, got.Version); err != nil {
		t.Fatal(err)
	}
	stored, _ := s.GetData("x")
	want := map[string]any{
		"password": "next", "port": json.Number("5432"), "tls": true, "hosts": []any{"a", "b"},
		"extra": map[string]any{"n": json.Number("1.5")},
	}
	if !reflect.DeepEqual(stored, want) {
		t.Errorf("after writing back what was read, the secret is\n%#v\nwant\n%#v", stored, want)
	}
}
