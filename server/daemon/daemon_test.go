package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/testpki"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// testOptions start a daemon on a fresh loopback port without the
// background privilege check.
func testOptions() Options {
	return Options{StoreNoSync: true, SkipPrivilegeCheck: true}
}

// targetConfig writes a configuration for a pgtest target: the password in
// a 0600 file, roles as given (name: proxy role), extra appended (YAML).
func targetConfig(t *testing.T, tg *pgtest.Target, password string, roles [][2]string, extra string) *config.Config {
	t.Helper()
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "listen: 127.0.0.1:0\nstore:\n  path: %q\n  open_timeout: 200ms\n", filepath.Join(dir, "leases.db"))
	fmt.Fprintf(&b, "targets:\n  - name: main\n    url: %q\n    password_file: %q\n    marker_role: %s\n    connect_timeout: 5s\n",
		tg.AdminURL, pw, tg.MarkerRole)
	b.WriteString("roles:\n")
	for _, r := range roles {
		fmt.Fprintf(&b, "  - {name: %s, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m}\n", r[0], r[1])
	}
	b.WriteString(extra)
	return parseConfig(t, b.String())
}

// parseConfig parses and validates a configuration that must be valid.
func parseConfig(t *testing.T, yaml string) *config.Config {
	t.Helper()
	f, err := config.Parse([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.Validate()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestStartReportsMissingProxyRoleWithKeyPath(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "read_only", Privileges: []string{"SELECT"}},
		{Name: "loginable", Login: true},
	}})
	cfg := targetConfig(t, tg, tg.AdminPassword, [][2]string{
		{"read_only", tg.ProxyRoles["read_only"]},
		{"ghost", "cbt_no_such_role"},
		{"loginable", tg.ProxyRoles["loginable"]},
	}, "")
	d, err := Start(context.Background(), cfg, testOptions())
	if err == nil {
		d.Close()
		t.Fatal("Start succeeded with a missing proxy role")
	}
	msg := err.Error()
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

	// Start closed the store on failure: it can be opened again at once
	// (bbolt's lock would otherwise time out).
	cfg.Roles = cfg.Roles[:1]
	d, err = Start(context.Background(), cfg, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

func TestStartWrongPassword(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	const wrong = "wrong-Password-123"
	cfg := targetConfig(t, tg, wrong, [][2]string{{"read_only", tg.ProxyRoles["read_only"]}}, "")
	d, err := Start(context.Background(), cfg, testOptions())
	if err == nil {
		d.Close()
		t.Fatal("Start succeeded with a wrong password")
	}
	if !strings.HasPrefix(err.Error(), "targets[0] (main): ") {
		t.Errorf("error does not name the target: %v", err)
	}
	if strings.Contains(err.Error(), wrong) {
		t.Errorf("error contains the password: %v", err)
	}
	if _, err := Check(context.Background(), cfg, true, nil); err == nil || !strings.HasPrefix(err.Error(), "targets[0] (main): ") {
		t.Errorf("Check --connect: %v", err)
	}
	// Without --connect nothing is dialled: the password file is fine.
	if _, err := Check(context.Background(), cfg, false, nil); err != nil {
		t.Errorf("Check: %v", err)
	}
}

// TestStartServesTheLifecycle: a started daemon issues a credential that
// logs in with the proxy role's privileges, and revokes it; it serves on
// the port it bound and stops when Serve's context ends.
func TestStartServesTheLifecycle(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfg := targetConfig(t, tg, tg.AdminPassword, [][2]string{
		{"read_only", tg.ProxyRoles["read_only"]},
		{"updater", tg.ProxyRoles["updater"]},
	}, "")
	if _, err := Check(context.Background(), cfg, true, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := Start(ctx, cfg, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := d.Close(); err != nil {
			t.Error(err)
		}
		if err := d.Close(); err != nil { // idempotent
			t.Error(err)
		}
	}()
	if ep := d.endpoints["main"]; ep.Database != tg.Database || ep.Port == 0 {
		t.Errorf("endpoint = %+v", ep)
	}
	if got := len(d.Broker().Roles()); got != 2 {
		t.Errorf("broker has %d roles", got)
	}
	serveCtx, stopServing := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- d.Serve(serveCtx) }()
	select {
	case <-d.Ready():
	case <-ctx.Done():
		t.Fatal("Serve never became ready")
	}

	lease, cred, err := d.Broker().Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if got := lease.ExpireTime.Sub(lease.IssueTime); got != time.Minute {
		t.Errorf("lease of %v, want the role's default 1m", got)
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

	if _, err := d.Broker().Revoke(ctx, lease.ID); err != nil {
		t.Fatal(err)
	}
	if c, err := pgx.Connect(ctx, tg.URL(cred.Username, cred.Password)); err == nil {
		c.Close(ctx)
		t.Error("revoked user can still log in")
	}
	stopServing()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
}

// TestStartStoreLocked: a second broker on the same store file is refused
// with the key path, and what the failed Start opened is closed.
func TestStartStoreLocked(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfg := targetConfig(t, tg, tg.AdminPassword, [][2]string{{"read_only", tg.ProxyRoles["read_only"]}}, "")
	d, err := Start(context.Background(), cfg, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d2, err := Start(context.Background(), cfg, testOptions())
	if err == nil {
		d2.Close()
		t.Fatal("second Start on a locked store succeeded")
	}
	if !strings.HasPrefix(err.Error(), "store.path: ") {
		t.Errorf("error = %v", err)
	}
}

func TestSecurityDefaultsKeepLoopbackBehaviour(t *testing.T) {
	sec, err := newSecurity(config.Security{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The policy in force (a reload may replace it) is the loopback one.
	if _, ok := sec.policy.p.Load().authn.(server.LocalAuthenticator); !ok {
		t.Errorf("authenticator %T, want LocalAuthenticator", sec.policy.p.Load().authn)
	}
	if len(sec.serverOptions) != 0 || sec.auditor != nil {
		t.Errorf("plaintext config got server options %d, auditor %v", len(sec.serverOptions), sec.auditor)
	}
}

// TestCheckLoadsTLSFiles: a key that does not match its certificate is
// found by Check (brokerd check), before a restart would find it.
func TestCheckLoadsTLSFiles(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.NewCA(t, "test-ca")
	caFile := ca.WriteCA(t, dir, "ca.crt")
	cert, _ := ca.WriteLeaf(t, dir, "server", testpki.Leaf{CN: "brokerd", Server: true})
	_, otherKey := ca.WriteLeaf(t, dir, "other", testpki.Leaf{CN: "other", Server: true})
	sec := config.Security{TLS: &config.TLS{CertFile: cert, KeyFile: otherKey, ClientCAFile: caFile}}
	_, err := Check(context.Background(), &config.Config{Security: sec}, false, nil)
	if err == nil || !strings.HasPrefix(err.Error(), "tls: ") {
		t.Fatalf("Check with a mismatched key: %v", err)
	}
	sec.TLS.KeyFile = filepath.Join(dir, "server.key")
	if _, err := Check(context.Background(), &config.Config{Security: sec}, false, nil); err != nil {
		t.Fatalf("Check with matching files: %v", err)
	}
}

// configCorpus mirrors the server's injection corpus for configuration
// values (invalid UTF-8 is covered by config's TestConfigRejectsInvalidUTF8).
var configCorpus = []string{
	"", `'`, `"`, `x'; DROP ROLE postgres; --`, `x"; DROP TABLE demo; --`,
	`read_only_role'; CREATE ROLE evil SUPERUSER; --`, `/* c */ r`, `r -- c`,
	`$$; DROP ROLE IF EXISTS credbroker_managed; $$`, `$tag$ x $tag$`, `\`, `\'`,
	"r\x00", "a\nb", "a\r\nb", strings.Repeat("a", 63), strings.Repeat("a", 64), strings.Repeat("x", 200),
	"pg_signal_backend", "pg_read_all_data", "postgres", "public", "READ_ONLY", " r", "r ", "😀", "1role",
}

// TestInjectionCorpusThroughConfig puts every corpus string in every
// identifier of the configuration. Each must be refused by Validate with
// its key path, or, if Validate accepts it as a name, refused by Start
// against a real PostgreSQL; and no role is created or dropped.
func TestInjectionCorpusThroughConfig(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	ctx := context.Background()
	rolesNow := func() []string {
		conn, err := pgx.Connect(ctx, tg.SuperURL)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		rows, _ := conn.Query(ctx, `SELECT rolname FROM pg_roles ORDER BY 1`)
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return names
	}
	before := rolesNow()
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) } // a YAML double-quoted scalar
	base := map[string]string{
		"target":  "main",
		"marker":  tg.MarkerRole,
		"url":     tg.AdminURL,
		"role":    "read_only",
		"proxy":   tg.ProxyRoles["read_only"],
		"admin":   "ops",
		"allowed": "svc",
		"tokenid": "svc",
	}
	render := func(v map[string]string) string {
		return "listen: 127.0.0.1:0\n" +
			"store: {path: " + q(filepath.Join(dir, "leases.db")) + ", open_timeout: 200ms}\n" +
			"targets:\n  - {name: " + q(v["target"]) + ", url: " + q(v["url"]) + ", password_file: " + q(pw) +
			", marker_role: " + q(v["marker"]) + ", connect_timeout: 5s}\n" +
			"roles:\n  - {name: " + q(v["role"]) + ", target: " + q(v["target"]) + ", proxy_role: " + q(v["proxy"]) +
			", default_ttl: 1m, max_ttl: 5m, allowed: [" + q(v["allowed"]) + "]}\n" +
			"tokens: [{identity: " + q(v["tokenid"]) + ", sha256: " + server.TokenHash("t") + "}]\n" +
			"admins: [" + q(v["admin"]) + "]\n"
	}
	// The base configuration is valid and starts: the corpus is what fails.
	d, err := Start(ctx, parseConfig(t, render(base)), testOptions())
	if err != nil {
		t.Fatalf("base config: %v", err)
	}
	d.Close()

	keyPath := map[string]string{
		"target": "targets[0].name", "marker": "targets[0].marker_role", "role": "roles[0].name",
		"proxy": "roles[0].proxy_role", "admin": "admins[0]", "allowed": "roles[0].allowed[0]", "tokenid": "tokens[0].identity",
	}
	var started int
	for field, path := range keyPath {
		for _, val := range configCorpus {
			v := maps.Clone(base)
			v[field] = val
			f, err := config.Parse([]byte(render(v)))
			if err != nil {
				// yaml refuses some bytes outright (NUL): a clear error too.
				continue
			}
			cfg, err := f.Validate()
			if err != nil {
				if !strings.Contains(err.Error(), path) && !strings.Contains(err.Error(), "roles[0].target") {
					t.Errorf("%s = %q: error does not name %s:\n%v", field, val, path, err)
				}
				continue
			}
			switch field {
			case "admin", "allowed", "tokenid", "target", "role":
				// Identities are compared and target and role names are
				// labels; none is ever sent to PostgreSQL, so any string
				// that passes Validate is a name.
				continue
			case "marker":
				// A well-formed marker role that does not exist is created
				// by the engine at start-up (by design, see
				// postgres.New), so Start is not run for it here.
				if val != "" {
					if err := postgres.ValidIdentifier(val); err != nil {
						t.Errorf("marker_role = %q passed Validate: %v", val, err)
					}
				}
				continue
			}
			started++
			d, err := Start(ctx, cfg, testOptions())
			if err == nil {
				d.Close()
				t.Errorf("%s = %q: Start succeeded", field, val)
			}
		}
	}
	t.Logf("%d corpus configurations passed Validate and were refused by Start", started)
	if after := rolesNow(); !slices.Equal(before, after) {
		t.Errorf("pg_roles changed:\nbefore %v\nafter  %v", before, after)
	}
}
