package config

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestMain starts one throwaway PostgreSQL for the Build tests; the parse
// and validate tests do not use it.
func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// targetYAML writes a configuration for a pgtest target: the password in a
// 0600 file, roles as given (name: proxy role).
func targetYAML(t *testing.T, tg *pgtest.Target, password string, roles [][2]string) *Config {
	t.Helper()
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "store:\n  path: %q\n  open_timeout: 200ms\n", filepath.Join(dir, "leases.db"))
	fmt.Fprintf(&b, "targets:\n  - name: main\n    url: %q\n    password_file: %q\n    marker_role: %s\n    connect_timeout: 5s\n",
		tg.AdminURL, pw, tg.MarkerRole)
	b.WriteString("roles:\n")
	for _, r := range roles {
		fmt.Fprintf(&b, "  - {name: %s, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m}\n", r[0], r[1])
	}
	f, err := Parse([]byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.Validate()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestBuildReportsMissingProxyRoleWithKeyPath(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "read_only", Privileges: []string{"SELECT"}},
		{Name: "loginable", Login: true},
	}})
	cfg := targetYAML(t, tg, tg.AdminPassword, [][2]string{
		{"read_only", tg.ProxyRoles["read_only"]},
		{"ghost", "cbt_no_such_role"},
		{"loginable", tg.ProxyRoles["loginable"]},
	})
	rt, err := Build(context.Background(), cfg, nil)
	if err == nil {
		rt.Close()
		t.Fatal("Build succeeded with a missing proxy role")
	}
	msg := err.Error()
	t.Logf("Build error:\n%s", msg)
	for _, want := range []string{
		`roles[1].proxy_role: target main: `, `"cbt_no_such_role" does not exist`,
		`roles[2].proxy_role: target main: `, "NOLOGIN",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not contain %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, "roles[0]") {
		t.Errorf("the valid role is reported:\n%s", msg)
	}
	if strings.Contains(msg, tg.AdminPassword) {
		t.Errorf("error contains the admin password")
	}

	// Build closed the store on failure: it can be opened again at once
	// (bbolt's lock would otherwise time out).
	cfg = targetYAML(t, tg, tg.AdminPassword, [][2]string{{"read_only", tg.ProxyRoles["read_only"]}})
	rt, err = Build(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	rt.Close()
}

func TestBuildWrongPassword(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	const wrong = "wrong-Password-123"
	cfg := targetYAML(t, tg, wrong, [][2]string{{"read_only", tg.ProxyRoles["read_only"]}})
	rt, err := Build(context.Background(), cfg, nil)
	if err == nil {
		rt.Close()
		t.Fatal("Build succeeded with a wrong password")
	}
	if !strings.HasPrefix(err.Error(), "targets[0] (main): ") {
		t.Errorf("error does not name the target: %v", err)
	}
	if strings.Contains(err.Error(), wrong) {
		t.Errorf("error contains the password: %v", err)
	}
	if err := CheckTargets(context.Background(), cfg, nil); err == nil || !strings.HasPrefix(err.Error(), "targets[0] (main): ") {
		t.Errorf("CheckTargets: %v", err)
	}
}

// TestBuildServesTheLifecycle: a built Runtime issues a credential that
// logs in with the proxy role's privileges, and revokes it.
func TestBuildServesTheLifecycle(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfg := targetYAML(t, tg, tg.AdminPassword, [][2]string{
		{"read_only", tg.ProxyRoles["read_only"]},
		{"updater", tg.ProxyRoles["updater"]},
	})
	if err := CheckTargets(context.Background(), cfg, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rt, err := Build(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := rt.Close(); err != nil {
			t.Error(err)
		}
		if err := rt.Close(); err != nil { // idempotent
			t.Error(err)
		}
	}()
	if ep := rt.Endpoints["main"]; ep.Database != tg.Database || ep.Port == 0 {
		t.Errorf("endpoint = %+v", ep)
	}
	if len(rt.Databases) != 1 || rt.Store == nil {
		t.Errorf("runtime = %+v", rt)
	}
	if err := rt.Broker.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := len(rt.Broker.Roles()); got != 2 {
		t.Errorf("broker has %d roles", got)
	}

	lease, cred, err := rt.Broker.Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if d := lease.ExpireTime.Sub(lease.IssueTime); d != time.Minute {
		t.Errorf("lease of %v, want the role's default 1m", d)
	}
	conn, err := pgx.Connect(ctx, tg.URL(cred.Username, cred.Password))
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM "+pgtest.DemoTable).Scan(&n); err != nil {
		t.Errorf("read_only cannot SELECT: %v", err)
	}
	if _, err := conn.Exec(ctx, "INSERT INTO "+pgtest.DemoTable+" (note) VALUES ('x')"); err == nil {
		t.Error("read_only could INSERT")
	}
	conn.Close(ctx)

	if _, err := rt.Broker.Revoke(ctx, lease.ID); err != nil {
		t.Fatal(err)
	}
	if c, err := pgx.Connect(ctx, tg.URL(cred.Username, cred.Password)); err == nil {
		c.Close(ctx)
		t.Error("revoked user can still log in")
	}
}

// TestBuildStoreLocked: a second broker on the same store file is refused
// with the key path, and what the failed Build opened is closed.
func TestBuildStoreLocked(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfg := targetYAML(t, tg, tg.AdminPassword, [][2]string{{"read_only", tg.ProxyRoles["read_only"]}})
	rt, err := Build(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	rt2, err := Build(context.Background(), cfg, nil)
	if err == nil {
		rt2.Close()
		t.Fatal("second Build on a locked store succeeded")
	}
	if !strings.HasPrefix(err.Error(), "store.path: ") {
		t.Errorf("error = %v", err)
	}
}
