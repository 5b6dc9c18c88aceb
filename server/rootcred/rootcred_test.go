package rootcred

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/internal/vaultkv"
	"github.com/credbroker/credbroker/internal/vaultkv/kvtest"
	"github.com/credbroker/credbroker/server/config"
)

// rootFixture is a pgtest target whose admin password lives in a file or
// in the in-process Vault.
type rootFixture struct {
	tg        *pgtest.Target
	kind      string // "file" or "vault"
	dir       string
	vault     *kvtest.Server // the in-process Vault, nil with a real one
	kv        kvSecrets      // the Vault, in-process or real
	vaultPath string
	yaml      string
	logs      *syncbuf.Buffer
}

// kvSecrets writes and reads a secret behind the broker's back.
type kvSecrets interface {
	PutData(path string, data map[string]any)
	GetData(path string) (map[string]any, int)
}

// realVault is a real Vault (VAULT_ADDR, VAULT_TOKEN; KV v2 at "secret").
type realVault struct {
	t    *testing.T
	addr string
	tok  string
}

func (r realVault) client(path string) *vaultkv.Client {
	c, err := vaultkv.New(context.Background(), vaultkv.Config{Address: r.addr, Mount: "secret", Path: path, Auth: vaultkv.AuthToken, Token: r.tok})
	if err != nil {
		r.t.Fatal(err)
	}
	return c
}

func (r realVault) PutData(path string, data map[string]any) {
	c := r.client(path)
	cur, err := c.Read(context.Background())
	if err != nil {
		cur.Version = 0 // a new secret
	}
	if _, err := c.Write(context.Background(), data, cur.Version); err != nil {
		r.t.Fatal(err)
	}
}

func (r realVault) GetData(path string) (map[string]any, int) {
	s, err := r.client(path).Read(context.Background())
	if err != nil {
		return nil, 0
	}
	return s.Data, s.Version
}

func newRootFixture(t *testing.T, kind string) *rootFixture {
	t.Helper()
	f := &rootFixture{tg: pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{}), kind: kind, dir: t.TempDir(), logs: &syncbuf.Buffer{}}
	var source string
	switch kind {
	case "file":
		source = fmt.Sprintf("password_file: %q", filepath.Join(f.dir, "admin.password"))
	case "vault":
		// A real Vault when VAULT_ADDR is set, else the in-process one.
		addr, tok := os.Getenv("VAULT_ADDR"), os.Getenv("VAULT_TOKEN")
		f.vaultPath = "credbroker-test/" + rand.Text()[:12]
		if addr != "" {
			f.kv = realVault{t: t, addr: addr, tok: tok}
		} else {
			f.vault = kvtest.New(t, time.Hour)
			f.kv, addr, tok = f.vault, f.vault.URL, f.vault.RootToken
		}
		tokenFile := filepath.Join(f.dir, "vault.token")
		if err := os.WriteFile(tokenFile, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		source = fmt.Sprintf("vault: {address: %q, path: %s, auth: token, token_file: %q}", addr, f.vaultPath, tokenFile)
	}
	f.setStored(t, f.tg.AdminPassword, "")
	f.yaml = fmt.Sprintf(`store: {path: %q, open_timeout: 200ms}
targets:
  - name: main
    url: %q
    marker_role: %s
    %s
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m}
`, filepath.Join(f.dir, "leases.db"), f.tg.AdminURL, f.tg.MarkerRole, source, f.tg.ProxyRoles["read_only"])
	return f
}

// setStored writes the current password and a pending one ("" for none)
// where the source keeps them, as a rotation would.
func (f *rootFixture) setStored(t *testing.T, current, pending string) {
	t.Helper()
	switch f.kind {
	case "file":
		path := filepath.Join(f.dir, "admin.password")
		if err := os.WriteFile(path, []byte(current+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_ = os.Remove(path + config.PendingSuffix)
		if pending != "" {
			if err := os.WriteFile(path+config.PendingSuffix, []byte(pending+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	case "vault":
		// Fields the broker does not use, one of them a number, as a DBA's
		// secret has: they must survive every write, with their type.
		data := map[string]any{"password": current, "owner": "dba-team", "port": 5432}
		if pending != "" {
			data["password"+config.PendingSuffix] = pending
		}
		f.kv.PutData(f.vaultPath, data)
	}
}

// stored returns what the source holds.
func (f *rootFixture) stored(t *testing.T) (current, pending string) {
	t.Helper()
	switch f.kind {
	case "file":
		path := filepath.Join(f.dir, "admin.password")
		cur, err := readPasswordFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("password file mode %v (%v), want 0600", fi.Mode(), err)
		}
		pend, err := readPasswordFile(path + config.PendingSuffix)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		return cur, pend
	default:
		data, _ := f.kv.GetData(f.vaultPath)
		if data["owner"] != "dba-team" {
			t.Errorf("another field of the Vault secret was lost: %v", data)
		}
		if port, ok := data["port"].(json.Number); !ok || port.String() != "5432" {
			t.Errorf("the numeric field port is %#v, want the number 5432", data["port"])
		}
		cur, _ := data["password"].(string)
		pend, _ := data["password"+config.PendingSuffix].(string)
		return cur, pend
	}
}

// connected is what brokerd holds of a target after start-up: the root
// credentials and the engine they connected.
type connected struct {
	RootCredentials *Credentials
	Databases       map[string]*postgres.Engine
}

func (c *connected) Close() {
	for _, db := range c.Databases {
		db.Close()
	}
}

// build connects the fixture's target as brokerd's start-up does.
func (f *rootFixture) build(t *testing.T) (*connected, error) {
	t.Helper()
	file, err := config.Parse([]byte(f.yaml))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := file.Validate()
	if err != nil {
		t.Fatal(err)
	}
	rc := New(slog.New(slog.NewTextHandler(f.logs, nil)))
	eng, err := rc.Connect(context.Background(), cfg.Targets[0])
	if err != nil {
		return nil, err
	}
	c := &connected{RootCredentials: rc, Databases: map[string]*postgres.Engine{"main": eng}}
	t.Cleanup(c.Close)
	return c, nil
}

// canLogin reports whether the admin logs in with password.
func (f *rootFixture) canLogin(t *testing.T, password string) bool {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), f.tg.URL(f.tg.AdminUser, password))
	if err != nil {
		return false
	}
	conn.Close(context.Background())
	return true
}

// alterAdmin sets the admin's password as a superuser would.
func (f *rootFixture) alterAdmin(t *testing.T, password string) {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), f.tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	v, err := postgres.ScramSHA256Verifier(password)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(context.Background(), "ALTER ROLE "+postgres.QuoteIdentifier(f.tg.AdminUser)+" PASSWORD '"+v+"'"); err != nil {
		t.Fatal(err)
	}
}

func TestRotateRoot(t *testing.T) {
	for _, kind := range []string{"file", "vault"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newRootFixture(t, kind)
			old := f.tg.AdminPassword
			rt, err := f.build(t)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			res, err := rt.RootCredentials.Rotate(context.Background(), "main")
			if err != nil {
				t.Fatalf("Rotate: %v", err)
			}
			if res.Target != "main" || !strings.HasPrefix(res.Source, kind) {
				t.Errorf("result %+v", res)
			}
			cur, pend := f.stored(t)
			if cur == old || len(cur) != len(broker.NewPassword()) || pend != "" {
				t.Fatalf("after Rotate the source holds a %d-byte password (changed: %v) and pending %v", len(cur), cur != old, pend != "")
			}
			if !f.canLogin(t, cur) || f.canLogin(t, old) {
				t.Fatalf("after Rotate: new password logs in %v, old one %v", f.canLogin(t, cur), f.canLogin(t, old))
			}
			// The running broker keeps working, and a restart reads the
			// new password.
			if err := rt.Databases["main"].CheckProxyRole(context.Background(), f.tg.ProxyRoles["read_only"]); err != nil {
				t.Errorf("engine after Rotate: %v", err)
			}
			rt.Close()
			if _, err := f.build(t); err != nil {
				t.Fatalf("Build after Rotate: %v", err)
			}
			if strings.Contains(f.logs.String(), cur) || strings.Contains(f.logs.String(), old) {
				t.Error("a password reached the log")
			}
		})
	}
}

// A crash between the steps of a rotation leaves the new password as
// pending; the next start settles it whichever side of ALTER ROLE the crash
// was on.
func TestRotateRootCrashRecovery(t *testing.T) {
	for _, kind := range []string{"file", "vault"} {
		for _, altered := range []bool{false, true} {
			name := kind + "/before ALTER ROLE"
			if altered {
				name = kind + "/after ALTER ROLE"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				f := newRootFixture(t, kind)
				old, next := f.tg.AdminPassword, "Pending"+rand.Text()[:20]
				f.setStored(t, old, next)
				want := old
				if altered {
					f.alterAdmin(t, next)
					want = next
				}
				if _, err := f.build(t); err != nil {
					t.Fatalf("Build with a pending rotation: %v", err)
				}
				cur, pend := f.stored(t)
				if cur != want || pend != "" {
					t.Fatalf("after recovery the source holds the %s password and pending %v",
						map[bool]string{true: "expected", false: "wrong"}[cur == want], pend != "")
				}
			})
		}
	}
}

// Vault failing between ALTER ROLE and storing the new password: the
// rotation reports it, the broker keeps working, and the next start
// completes it.
func TestRotateRootCommitFails(t *testing.T) {
	t.Parallel()
	f := newRootFixture(t, "vault")
	if f.vault == nil {
		t.Skip("needs the in-process Vault to fail a write on cue (VAULT_ADDR is set)")
	}
	rt, err := f.build(t)
	if err != nil {
		t.Fatal(err)
	}
	var writes atomic.Int32
	f.vault.FailWrites(func(string) bool { return writes.Add(1) == 2 }) // the stage passes, the commit fails
	_, err = rt.RootCredentials.Rotate(context.Background(), "main")
	if err == nil || !strings.Contains(err.Error(), "recorded as pending") {
		t.Fatalf("Rotate: %v, want the commit failure", err)
	}
	cur, pend := f.stored(t)
	if cur != f.tg.AdminPassword || pend == "" || !f.canLogin(t, pend) {
		t.Fatalf("after the failed commit: current unchanged %v, pending logs in %v", cur == f.tg.AdminPassword, pend != "" && f.canLogin(t, pend))
	}
	if strings.Contains(err.Error(), pend) {
		t.Error("the error holds the new password")
	}
	f.vault.FailWrites(nil)
	rt.Close()
	if _, err := f.build(t); err != nil {
		t.Fatalf("Build after the failed commit: %v", err)
	}
	if cur2, pend2 := f.stored(t); cur2 != pend || pend2 != "" {
		t.Fatal("the next start did not complete the rotation")
	}
}

func TestRotateRootRefused(t *testing.T) {
	f := newRootFixture(t, "file")
	t.Setenv("CB_TEST_ADMIN_PASSWORD", f.tg.AdminPassword)
	f.yaml = strings.Replace(f.yaml, fmt.Sprintf("password_file: %q", filepath.Join(f.dir, "admin.password")), "password_env: CB_TEST_ADMIN_PASSWORD", 1)
	rt, err := f.build(t)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rt.RootCredentials.Rotate(context.Background(), "main"); !errors.Is(err, ErrRotateNotWritable) {
		t.Errorf("Rotate of an env password: %v, want ErrRotateNotWritable", err)
	}
	if _, err := rt.RootCredentials.Rotate(context.Background(), "nope"); !errors.Is(err, ErrRotateUnknownTarget) {
		t.Errorf("Rotate of an unknown target: %v", err)
	}
	if !f.canLogin(t, f.tg.AdminPassword) {
		t.Error("a refused rotation changed the password")
	}
}

func TestRefreshRootPassword(t *testing.T) {
	for _, kind := range []string{"file", "vault"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newRootFixture(t, kind)
			rt, err := f.build(t)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if got := rt.RootCredentials.Refresh(ctx); len(got) != 0 {
				t.Errorf("Refresh with nothing changed: %v", got)
			}
			// A DBA rotates by hand: PostgreSQL first, then the source.
			next := "Manual" + rand.Text()[:20]
			f.alterAdmin(t, next)
			f.setStored(t, next, "")
			if got := rt.RootCredentials.Refresh(ctx); len(got) != 1 || got[0] != "main" {
				t.Fatalf("Refresh after a change: %v", got)
			}
			// A password PostgreSQL refuses is not taken.
			f.setStored(t, "Wrong"+rand.Text()[:20], "")
			if got := rt.RootCredentials.Refresh(ctx); len(got) != 0 {
				t.Errorf("Refresh took a refused password: %v", got)
			}
			if !strings.Contains(f.logs.String(), "PostgreSQL refuses it") {
				t.Errorf("no warning about the refused password:\n%s", f.logs.String())
			}
			// A rotation repairs a source that drifted: it needs only the
			// engine's connection, and stores a password that logs in.
			if _, err := rt.RootCredentials.Rotate(ctx, "main"); err != nil {
				t.Fatalf("Rotate: %v", err)
			}
			if cur, _ := f.stored(t); !f.canLogin(t, cur) {
				t.Error("after Rotate the source holds a password that does not log in")
			}
		})
	}
}

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
