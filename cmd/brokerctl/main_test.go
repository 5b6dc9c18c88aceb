package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/credbroker/credbroker/internal/buildinfo"
	"github.com/credbroker/credbroker/internal/pgtest"
	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// testBroker is a real broker (bbolt in t.TempDir, a pgtest target)
// served on a loopback listener, as brokerd serves it.
type testBroker struct {
	addr   string
	target *pgtest.Target
}

// startBroker starts the broker of a configuration file through package
// daemon, so the CLI is tested against what brokerd runs. network is
// "tcp" or "unix".
func startBroker(t *testing.T, network string) *testBroker {
	t.Helper()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	yml := fmt.Sprintf(`store:
  path: %q
targets:
  - name: main
    url: %q
    password_file: %q
    marker_role: %s
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 15m, max_ttl: 1h}
  - {name: updater, target: main, proxy_role: %s, default_ttl: 5m, max_ttl: 15m}
dsn_sslmode: disable
`, filepath.Join(dir, "leases.db"), tg.AdminURL, pw, tg.MarkerRole, tg.ProxyRoles["read_only"], tg.ProxyRoles["updater"])
	f, err := config.Parse([]byte(yml))

	var lis net.Listener
	if network == "unix" {
		// A short path: sun_path holds 108 bytes and t.TempDir can be long.
		sockDir, err := os.MkdirTemp("", "cbctl")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(sockDir) })
		sock := filepath.Join(sockDir, "s")
		if lis, err = net.Listen("unix", sock); err != nil {
			t.Fatal(err)
		}
	}
	return &testBroker{addr: serveConfigFile(t, f, err, lis), target: tg}
}

// inAbout reports whether an expiry column says "(in <exact>)", or a few
// seconds less on a slow machine ("(in <prefix>Ns)").
func inAbout(s, exact, slowPrefix string) bool {
	return strings.HasSuffix(s, "(in "+exact+")") || regexp.MustCompile(`\(in `+slowPrefix+`\ds\)$`).MatchString(s)
}

type result struct {
	stdout, stderr string
	code           int
}

// ctl runs one brokerctl command line in-process.
func ctl(t *testing.T, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code := run(ctx, args, &out, &errOut)
	return result{out.String(), errOut.String(), code}
}

// ok runs a command that must succeed.
func (b *testBroker) ok(t *testing.T, args ...string) string {
	t.Helper()
	r := ctl(t, append([]string{"--addr", b.addr}, args...)...)
	if r.code != 0 {
		t.Fatalf("brokerctl %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	if r.stderr != "" {
		t.Errorf("brokerctl %s: unexpected stderr %q", strings.Join(args, " "), r.stderr)
	}
	return r.stdout
}

// fields parses "name  value" lines.
func fields(out string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		k, v, _ := strings.Cut(line, " ")
		m[k] = strings.TrimSpace(v)
	}
	return m
}

// tableRows parses a table into rows of cells; row 0 is the header.
func tableRows(out string) [][]string {
	var rows [][]string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		rows = append(rows, regexp.MustCompile(`\s{2,}`).Split(strings.TrimSpace(line), -1))
	}
	return rows
}

func TestIssueLookupLeasesRevoke(t *testing.T) {
	b := startBroker(t, "tcp")
	ctx := context.Background()

	issued := fields(b.ok(t, "issue", "read_only", "--ttl", "10m", "--meta", "app=billing", "--meta", "note=a=b"))
	id := issued["lease_id"]
	if len(id) != 32 || !strings.HasPrefix(issued["username"], "cb_read_only_") || len(issued["password"]) < 20 {
		t.Fatalf("issue printed %q", issued)
	}
	if issued["database"] != b.target.Database || issued["host"] != "127.0.0.1" || issued["role"] != "read_only" {
		t.Errorf("issue printed %q", issued)
	}
	if !inAbout(issued["expires"], "10m", "9m5") || !inAbout(issued["max_expires"], "1h", "59m5") {
		t.Errorf("expiry: %q / %q", issued["expires"], issued["max_expires"])
	}
	dsn := issued["dsn"]
	if !strings.Contains(dsn, issued["username"]+":"+issued["password"]+"@") || !strings.Contains(dsn, "sslmode=disable") {
		t.Errorf("dsn = %q", dsn)
	}

	// The printed DSN logs in with the proxy role's privileges.
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("login with the printed dsn: %v", err)
	}
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM "+pgtest.DemoTable).Scan(&n); err != nil {
		t.Errorf("SELECT: %v", err)
	}
	conn.Close(ctx)

	looked := fields(b.ok(t, "lookup", id))
	if looked["lease_id"] != id || looked["state"] != "active" || looked["client"] != server.LocalIdentityName ||
		looked["meta.app"] != "billing" || looked["meta.note"] != "a=b" || looked["target"] != "main" {
		t.Errorf("lookup printed %q", looked)
	}
	if _, has := looked["password"]; has {
		t.Error("lookup printed a password")
	}

	rows := tableRows(b.ok(t, "leases"))
	if want := []string{"LEASE", "ROLE", "CLIENT", "USERNAME", "STATE", "EXPIRES", "SESSIONS", "LAST_SEEN"}; fmt.Sprint(rows[0]) != fmt.Sprint(want) {
		t.Errorf("header = %q", rows[0])
	}
	if len(rows) != 2 || rows[1][0] != id || rows[1][1] != "read_only" || rows[1][4] != "active" || rows[1][6] != "0" || rows[1][7] != "never" {
		t.Errorf("leases printed %q", rows)
	}

	renewed := fields(b.ok(t, "renew", id, "--increment", "30m"))
	if !inAbout(renewed["expires"], "30m", "29m5") {
		t.Errorf("renew printed %q", renewed)
	}

	revoked := fields(b.ok(t, "revoke", id))
	if revoked["state"] != "revoked" || revoked["ended"] == "" || strings.Contains(revoked["expires"], "(in") {
		t.Errorf("revoke printed %q", revoked)
	}
	if c, err := pgx.Connect(ctx, dsn); err == nil {
		c.Close(ctx)
		t.Error("the revoked credential still logs in")
	}
	// Revoking again succeeds and changes nothing.
	if again := fields(b.ok(t, "revoke", id)); again["ended"] != revoked["ended"] {
		t.Errorf("second revoke changed the lease: %q", again)
	}

	rows = tableRows(b.ok(t, "leases", "--state", "active"))
	if len(rows) != 1 {
		t.Errorf("active leases after revoke: %q", rows)
	}
	rows = tableRows(b.ok(t, "leases", "--state", "revoked", "--role", "read_only", "--client", "local"))
	if len(rows) != 2 || rows[1][4] != "revoked" {
		t.Errorf("revoked leases: %q", rows)
	}
}

func TestJSONOutput(t *testing.T) {
	b := startBroker(t, "tcp")

	out := b.ok(t, "--json", "issue", "updater", "--meta", "k=v")
	var issue credbrokerv1.IssueCredentialResponse
	if err := protojson.Unmarshal([]byte(out), &issue); err != nil {
		t.Fatalf("issue --json is not a protojson IssueCredentialResponse: %v\n%s", err, out)
	}
	if issue.GetLease().GetRole() != "updater" || issue.GetCredential().GetPassword() == "" || issue.GetCredential().GetDsn() == "" {
		t.Errorf("issue --json = %s", out)
	}
	// lowerCamelCase names, enums by name, one document.
	for _, want := range []string{`"maxExpireTime"`, `"issueTime"`, `"state": "LEASE_STATE_ACTIVE"`, `"dsn"`} {
		if !strings.Contains(out, want) {
			t.Errorf("issue --json lacks %s:\n%s", want, out)
		}
	}
	var doc map[string]any
	dec := json.NewDecoder(strings.NewReader(out))
	if err := dec.Decode(&doc); err != nil || dec.More() {
		t.Errorf("not exactly one JSON document (%v)", err)
	}
	id := issue.GetLease().GetId()

	out = b.ok(t, "lookup", id, "--json")
	var look credbrokerv1.LookupLeaseResponse
	if err := protojson.Unmarshal([]byte(out), &look); err != nil || look.GetLease().GetMetadata()["k"] != "v" {
		t.Errorf("lookup --json: %v\n%s", err, out)
	}
	if strings.Contains(out, issue.GetCredential().GetPassword()) {
		t.Error("lookup --json shows the password")
	}

	out = b.ok(t, "--json", "leases")
	var list credbrokerv1.ListLeasesResponse
	if err := protojson.Unmarshal([]byte(out), &list); err != nil || len(list.GetLeases()) != 1 {
		t.Errorf("leases --json: %v\n%s", err, out)
	}

	out = b.ok(t, "--json", "roles")
	var roles credbrokerv1.ListRolesResponse
	if err := protojson.Unmarshal([]byte(out), &roles); err != nil || len(roles.GetRoles()) != 2 {
		t.Fatalf("roles --json: %v\n%s", err, out)
	}
	if !strings.Contains(out, `"proxyRole"`) || !strings.Contains(out, `"defaultTtl": "900s"`) && !strings.Contains(out, `"defaultTtl": "300s"`) {
		t.Errorf("roles --json:\n%s", out)
	}

	out = b.ok(t, "--json", "revoke", "--role", "updater")
	if !strings.Contains(out, `"revokedCount": 1`) {
		t.Errorf("revoke --role --json:\n%s", out)
	}
	// Zero is printed, not left out, so scripts need no default.
	out = b.ok(t, "--json", "revoke", "--role", "updater")
	if !strings.Contains(out, `"revokedCount": 0`) {
		t.Errorf("second revoke --role --json:\n%s", out)
	}
}

func TestRolesTable(t *testing.T) {
	b := startBroker(t, "tcp")
	rows := tableRows(b.ok(t, "roles"))
	want := [][]string{
		{"NAME", "TARGET", "PROXY ROLE", "DATABASE", "DEFAULT TTL", "MAX TTL"},
		{"read_only", "main", b.target.ProxyRoles["read_only"], b.target.Database, "15m", "1h"},
		{"updater", "main", b.target.ProxyRoles["updater"], b.target.Database, "5m", "15m"},
	}
	if fmt.Sprint(rows) != fmt.Sprint(want) {
		t.Errorf("roles:\n got %q\nwant %q", rows, want)
	}
}

func TestRevokeSelectors(t *testing.T) {
	b := startBroker(t, "tcp")
	var ids []string
	for _, role := range []string{"read_only", "read_only", "updater", "updater"} {
		ids = append(ids, fields(b.ok(t, "issue", role))["lease_id"])
	}
	if out := b.ok(t, "revoke", ids[0], ids[1]); out != "revoked 2 lease(s)\n" {
		t.Errorf("revoke ID ID: %q", out)
	}
	if out := b.ok(t, "revoke", "--client", "someone-else"); out != "revoked 0 lease(s)\n" {
		t.Errorf("revoke --client: %q", out)
	}
	if out := b.ok(t, "revoke", "--role", "updater", "--client", "local"); out != "revoked 2 lease(s)\n" {
		t.Errorf("revoke --role --client: %q", out)
	}
	if rows := tableRows(b.ok(t, "leases", "--state", "active")); len(rows) != 1 {
		t.Errorf("active leases left: %q", rows)
	}
}

func TestLeasesPaging(t *testing.T) {
	b := startBroker(t, "tcp")
	for i := 0; i < 5; i++ {
		b.ok(t, "issue", "read_only")
	}
	r := ctl(t, "--addr", b.addr, "leases", "--page-size", "2")
	if r.code != 0 || len(tableRows(r.stdout)) != 3 {
		t.Fatalf("one page: exit %d\n%s", r.code, r.stdout)
	}
	m := regexp.MustCompile(`more leases: rerun with --page-token (\S+), or --all`).FindStringSubmatch(r.stderr)
	if m == nil {
		t.Fatalf("no page token on stderr: %q", r.stderr)
	}
	next := ctl(t, "--addr", b.addr, "leases", "--page-size", "2", "--page-token", m[1])
	if next.code != 0 || len(tableRows(next.stdout)) != 3 || tableRows(next.stdout)[1][0] == tableRows(r.stdout)[1][0] {
		t.Errorf("second page:\n%s", next.stdout)
	}

	if rows := tableRows(b.ok(t, "leases", "--all", "--page-size", "2")); len(rows) != 6 {
		t.Errorf("--all: %d rows", len(rows))
	}
	var list credbrokerv1.ListLeasesResponse
	out := b.ok(t, "leases", "--all", "--page-size", "2", "--json")
	if err := protojson.Unmarshal([]byte(out), &list); err != nil || len(list.GetLeases()) != 5 || list.GetNextPageToken() != "" {
		t.Errorf("--all --json: %v, %d leases, token %q", err, len(list.GetLeases()), list.GetNextPageToken())
	}
}

func TestErrors(t *testing.T) {
	b := startBroker(t, "tcp")
	tests := []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"issue", "no_such_role"}, 1, `error: NotFound: `},
		{[]string{"lookup", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}, 1, "error: NotFound: "},
		{[]string{"lookup", "not-a-lease"}, 1, "error: InvalidArgument: "},
		{[]string{"renew", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}, 1, "error: NotFound: "},
		{[]string{"revoke"}, 2, "error: name a lease, or select leases with --role or --client"},
		{[]string{"issue"}, 2, "error: accepts 1 arg(s), received 0"},
		{[]string{"issue", "read_only", "--ttl", "-1m"}, 2, "error: --ttl -1m0s: must not be negative"},
		{[]string{"issue", "read_only", "--meta", "novalue"}, 2, `error: --meta "novalue": want key=value`},
		{[]string{"issue", "read_only", "--ttl", "soon"}, 2, `invalid argument "soon" for "--ttl"`},
		{[]string{"leases", "--state", "bogus"}, 2, `error: --state "bogus": want one of active|expired|revoke_failed|revoked|revoking`},
		{[]string{"bogus"}, 2, `error: unknown command "bogus" for "brokerctl"`},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			r := ctl(t, append([]string{"--addr", b.addr}, tc.args...)...)
			if r.code != tc.code || !strings.HasPrefix(r.stderr, "error: ") || !strings.Contains(r.stderr, tc.stderr) {
				t.Errorf("exit %d, stderr %q; want exit %d, stderr containing %q", r.code, r.stderr, tc.code, tc.stderr)
			}
			if r.stdout != "" {
				t.Errorf("stdout on error: %q", r.stdout)
			}
		})
	}
	r := ctl(t, "--addr", b.addr, "issue", "no_such_role")
	if !strings.Contains(r.stderr, "no_such_role") {
		t.Errorf("unknown role error does not name the role: %q", r.stderr)
	}
}

func TestAddr(t *testing.T) {
	b := startBroker(t, "tcp")

	t.Setenv(addrEnv, b.addr)
	if r := ctl(t, "roles"); r.code != 0 || !strings.Contains(r.stdout, "read_only") {
		t.Errorf("roles via $%s: exit %d %q %q", addrEnv, r.code, r.stdout, r.stderr)
	}

	// --addr wins over the environment.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := closed.Addr().String()
	closed.Close()
	r := ctl(t, "--addr", dead, "roles")
	if r.code != 1 || !strings.HasPrefix(r.stderr, "error: Unavailable: ") || !strings.Contains(r.stderr, "hint: is brokerd running") {
		t.Errorf("dead --addr: exit %d, stderr %q", r.code, r.stderr)
	}

	t.Setenv(addrEnv, dead)
	if r := ctl(t, "roles"); r.code != 1 || !strings.Contains(r.stderr, "Unavailable") {
		t.Errorf("dead $%s: exit %d, stderr %q", addrEnv, r.code, r.stderr)
	}

	// Plaintext to a routable address is refused before any I/O.
	r = ctl(t, "--addr", "10.1.2.3:7450", "roles")
	if r.code != 2 || !strings.Contains(r.stderr, "only allowed to loopback or a unix socket") {
		t.Errorf("non-loopback --addr: exit %d, stderr %q", r.code, r.stderr)
	}

	if r := ctl(t, "--addr", "127.0.0.1:1", "--timeout", "1ns", "roles"); r.code != 1 || !strings.Contains(r.stderr, "DeadlineExceeded") {
		t.Errorf("--timeout: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestUnixSocket(t *testing.T) {
	b := startBroker(t, "unix")
	issued := fields(b.ok(t, "issue", "read_only"))
	if issued["lease_id"] == "" {
		t.Fatalf("issue over %s printed %q", b.addr, issued)
	}
	if rows := tableRows(b.ok(t, "leases")); len(rows) != 2 {
		t.Errorf("leases over unix: %q", rows)
	}
}

func TestHelpExitsZero(t *testing.T) {
	r := ctl(t, "--help")
	if r.code != 0 || !strings.Contains(r.stdout, "issue") || !strings.Contains(r.stdout, addrEnv) {
		t.Errorf("--help: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

func TestShortDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		15 * time.Minute: "15m", time.Hour: "1h", 90 * time.Minute: "1h30m",
		90 * time.Second: "1m30s", 5 * time.Second: "5s", 0: "0s", 2*time.Hour + 5*time.Second: "2h0m5s",
	} {
		if got := shortDuration(d); got != want {
			t.Errorf("shortDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

// TestVersion: --version names the build (package buildinfo) and exits 0.
func TestVersion(t *testing.T) {
	r := ctl(t, "--version")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "brokerctl version ") || !strings.Contains(r.stdout, buildinfo.Read().String()) {
		t.Errorf("--version: exit %d, %q", r.code, r.stdout)
	}
}
