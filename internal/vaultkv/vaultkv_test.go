package vaultkv_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/syncbuf"
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
	v1, err := c.Write(ctx, map[string]string{"password": "first", "other": "kept"}, 0)
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
	if _, err := c.Write(ctx, map[string]string{"password": "second"}, v1); err != nil {
		t.Fatalf("Write with cas %d: %v", v1, err)
	}
	if _, err := c.Write(ctx, map[string]string{"password": "stale"}, v1); !errors.Is(err, vaultkv.ErrVersionConflict) {
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

type syncBuffer = syncbuf.Buffer

func TestKeepTokenAlive(t *testing.T) {
	// Tokens live 2s, so the lifetime watcher renews within about 1.5s.
	s := kvtest.New(t, 2*time.Second)
	var logs syncBuffer
	for _, auth := range []string{vaultkv.AuthToken, vaultkv.AuthAppRole} {
		t.Run(auth, func(t *testing.T) {
			c, err := vaultkv.New(context.Background(), vaultkv.Config{
				Address: s.URL, Mount: s.Mount, Path: "x", Auth: auth,
				Token: s.RootToken, RoleID: s.RoleID, SecretID: s.SecretID,
				Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() {
				c.KeepTokenAlive(ctx)
				close(done)
			}()
			for i := 0; i < 2; i++ {
				select {
				case tok := <-s.Renewals():
					if auth == vaultkv.AuthToken && tok != s.RootToken {
						t.Errorf("renewed token %q, want the configured one", tok)
					}
				case <-time.After(15 * time.Second):
					t.Fatalf("renewal %d never came", i+1)
				}
			}
			cancel()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("KeepTokenAlive did not return after ctx was cancelled")
			}
		})
	}
	if strings.Contains(logs.String(), s.RootToken) || strings.Contains(logs.String(), s.SecretID) {
		t.Error("a credential reached the log")
	}
}
