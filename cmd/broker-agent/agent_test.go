package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/clients/credbroker"
	"github.com/credbroker/credbroker/internal/brokertest"
	"github.com/credbroker/credbroker/internal/buildinfo"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

type syncBuffer = syncbuf.Buffer

// runningAgent is an agent run in-process, as main would run it.
type runningAgent struct {
	a      *agent
	events chan credbroker.Event
	sigs   chan os.Signal
	exit   chan int
	logs   *syncBuffer
	cancel context.CancelFunc
}

func startAgent(t *testing.T, args ...string) *runningAgent {
	t.Helper()
	logs := &syncBuffer{}
	cfg, err := parseConfig(args, logs, logs)
	if err != nil {
		t.Fatalf("parseConfig(%q): %v", args, err)
	}
	a, err := newAgent(cfg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	ra := &runningAgent{a: a, events: make(chan credbroker.Event, 256), sigs: make(chan os.Signal, 4), exit: make(chan int, 1), logs: logs}
	a.observe = func(ev credbroker.Event) {
		select {
		case ra.events <- ev:
		default:
		}
	}
	a.healthAddr = make(chan string, 1)
	ctx, cancel := context.WithCancel(context.Background())
	ra.cancel = cancel
	go func() { ra.exit <- a.run(ctx, ra.sigs) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-ra.exit:
		case <-time.After(time.Minute):
			t.Error("the agent did not exit")
		}
	})
	return ra
}

// waitEvent waits for an event of type want, with a deadline.
func (ra *runningAgent) waitEvent(t *testing.T, want credbroker.EventType, deadline time.Duration) (credbroker.Event, []credbroker.Event) {
	t.Helper()
	timeout := time.After(deadline)
	var seen []credbroker.Event
	for {
		select {
		case ev := <-ra.events:
			if ev.Type == want {
				return ev, seen
			}
			seen = append(seen, ev)
		case <-timeout:
			t.Fatalf("no %v event within %v; log:\n%s", want, deadline, ra.logs.String())
		}
	}
}

// waitFile waits until the file exists and cond holds for its content.
func waitFile(t *testing.T, path string, cond func([]byte) bool) []byte {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(path)
		if err == nil && cond(b) {
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never got the expected content (last: %v)", path, err)
		}
		time.Sleep(10 * time.Millisecond) // polling a file: there is nothing to wait on
	}
}

func readJSON(t *testing.T, b []byte) templateData {
	t.Helper()
	var d templateData
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("credential file: %v", err)
	}
	return d
}

func loginDSN(ctx context.Context, dsn string) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return conn.Ping(ctx)
}

func assertNoPassword(t *testing.T, logs, password string) {
	t.Helper()
	if password == "" {
		t.Fatal("no password to look for")
	}
	if strings.Contains(logs, password) {
		t.Fatal("the agent logged a password")
	}
}

// TestAgentSurvivesBrokerRestart: the broker restarts while the agent
// runs; the agent reconnects and keeps its lease, and the file keeps the
// same credential.
func TestAgentSurvivesBrokerRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := brokertest.Start(t, brokertest.Options{})
	out := filepath.Join(t.TempDir(), "db.json")
	ra := startAgent(t, "--broker", b.Addr, "--role", "read_only", "--out", out, "--health-listen", "127.0.0.1:0")
	first := readJSON(t, waitFile(t, out, func(b []byte) bool { return len(b) > 0 }))
	fi, err := os.Stat(out)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("credential file mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	if err := loginDSN(ctx, first.DSN); err != nil {
		t.Fatalf("the rendered DSN does not log in: %v", err)
	}
	ra.waitEvent(t, credbroker.EventRenewed, 10*time.Second)

	b.Restart()
	_, seen := ra.waitEvent(t, credbroker.EventDisconnected, 20*time.Second)
	_, more := ra.waitEvent(t, credbroker.EventReconnected, 20*time.Second)
	renewed, more2 := ra.waitEvent(t, credbroker.EventRenewed, 20*time.Second)
	for _, ev := range append(append(seen, more...), more2...) {
		if ev.Type == credbroker.EventIssued || ev.Type == credbroker.EventReplaced {
			t.Fatalf("a new credential was issued across the restart (%v)", ev.Type)
		}
	}
	if renewed.Lease.ID != first.LeaseID {
		t.Fatalf("renewed %s after the restart, want %s", renewed.Lease.ID, first.LeaseID)
	}
	if now := readJSON(t, waitFile(t, out, func([]byte) bool { return true })); now.LeaseID != first.LeaseID || now.Password != first.Password {
		t.Fatalf("the file changed across the restart: lease %s", now.LeaseID)
	}

	// /healthz: up, naming the lease, and no secret in it.
	addr := <-ra.a.healthAddr
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), first.LeaseID) || strings.Contains(string(body), first.Password) {
		t.Fatalf("/healthz = %d %s", resp.StatusCode, body)
	}

	// SIGTERM: the agent revokes its lease and exits 0.
	ra.sigs <- syscall.SIGTERM
	select {
	case code := <-ra.exit:
		ra.exit <- code // for the cleanup
		if code != 0 {
			t.Fatalf("exit code %d, want 0", code)
		}
	case <-time.After(time.Minute):
		t.Fatal("the agent did not exit on SIGTERM")
	}
	if ok, err := b.RoleExists(ctx, first.Username); err != nil || ok {
		t.Fatalf("the user survived the agent's SIGTERM: %v %v", ok, err)
	}
	// The file named a user that is gone now: it goes too.
	if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the credential file outlived its revoked user: %v", err)
	}
	assertNoPassword(t, ra.logs.String(), first.Password)
}

// TestAgentRendersFreshCredentialAfterAdminRevoke: an admin revokes the
// agent's lease; the agent hears REVOKED on its stream (with a generous
// deadline, the broker pushes it within a second) and renders a fresh
// credential.
func TestAgentRendersFreshCredentialAfterAdminRevoke(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := brokertest.Start(t, brokertest.Options{})
	out := filepath.Join(t.TempDir(), "db.env")
	ra := startAgent(t, "--broker", b.Addr, "--role", "read_only", "--out", out, "--format", "env", "--no-revoke-on-exit")
	first := string(waitFile(t, out, func(b []byte) bool { return len(b) > 0 }))
	ra.waitEvent(t, credbroker.EventRenewed, 10*time.Second)
	lease, _, _ := ra.a.keeper.Current()
	if !strings.Contains(first, "PGUSER="+lease.Username+"\n") || !strings.Contains(first, "CREDBROKER_LEASE_ID="+lease.ID+"\n") {
		t.Fatalf("env file does not name the lease's user:\n%s", strings.ReplaceAll(first, "PGPASSWORD", "PGPASSWORD(hidden)"))
	}

	admin, err := credbroker.Dial(b.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if n, err := admin.RevokeLeases(ctx, credbroker.RevokeSelector{LeaseIDs: []string{lease.ID}}); err != nil || n != 1 {
		t.Fatalf("RevokeLeases = %d, %v", n, err)
	}
	revokedAt := time.Now()
	ev, _ := ra.waitEvent(t, credbroker.EventRevoked, 5*time.Second)
	t.Logf("REVOKED heard %v after RevokeLeases returned", time.Since(revokedAt).Round(time.Millisecond))
	if ev.Lease.ID != lease.ID {
		t.Fatalf("REVOKED for %s, want %s", ev.Lease.ID, lease.ID)
	}
	fresh, _ := ra.waitEvent(t, credbroker.EventIssued, 20*time.Second)
	content := string(waitFile(t, out, func(b []byte) bool { return strings.Contains(string(b), fresh.Lease.ID) }))
	if !strings.Contains(content, "PGUSER="+fresh.Lease.Username+"\n") {
		t.Fatal("the re-rendered file does not name the fresh user")
	}
	if err := loginDSN(ctx, fresh.Credential.DSN); err != nil {
		t.Fatalf("the fresh credential does not log in: %v", err)
	}
	// The agent and the client library share a logger: one line for one
	// event, not one from each.
	if n := strings.Count(ra.logs.String(), "event=revoked"); n != 1 {
		t.Errorf("the revocation was logged %d times, want once:\n%s", n, ra.logs.String())
	}
	assertNoPassword(t, ra.logs.String(), fresh.Credential.Password)
}

// runAgent runs the agent as main does and waits, with a deadline, for
// its exit status.
func runAgent(t *testing.T, deadline time.Duration, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs := &syncBuffer{}
	exit := make(chan int, 1)
	go func() { exit <- run(ctx, args, make(chan os.Signal), logs, logs) }()
	select {
	case code := <-exit:
		return code, logs.String()
	case <-time.After(deadline):
		cancel()
		<-exit
		t.Fatalf("the agent still ran after %v; log:\n%s", deadline, logs.String())
		return 0, ""
	}
}

// TestAgentExitsAtOnceOnUnknownRole: a role the broker does not know is
// not going to appear by retrying; the agent says so and exits 1 instead
// of retrying for ever.
func TestAgentExitsAtOnceOnUnknownRole(t *testing.T) {
	b := brokertest.Start(t, brokertest.Options{})
	out := filepath.Join(t.TempDir(), "db.json")
	code, logs := runAgent(t, 30*time.Second, "--broker", b.Addr, "--role", "no_such_role", "--out", out)
	if code != 1 {
		t.Fatalf("exit %d, want 1; log:\n%s", code, logs)
	}
	if !strings.Contains(logs, "level=ERROR") || !strings.Contains(logs, "NotFound") || !strings.Contains(logs, "no_such_role") {
		t.Errorf("the log does not say why:\n%s", logs)
	}
	if strings.Contains(logs, "retry_in") {
		t.Errorf("the agent retried a permanent error:\n%s", logs)
	}
	if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a credential file appeared: %v", err)
	}
}

// TestAgentExitsWhenItsRoleIsRemoved: the role is removed from brokerd's
// configuration while the agent holds a credential of it. The agent's
// next issue (the replacement before the max TTL) is refused for good; the
// agent revokes what it holds, removes the file and exits 1, without
// spinning.
func TestAgentExitsWhenItsRoleIsRemoved(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	readOnly := brokertest.Role{Name: "read_only", DefaultTTL: 10 * time.Minute, MaxTTL: time.Hour}
	b := brokertest.Start(t, brokertest.Options{Roles: []brokertest.Role{readOnly, {Name: "short", DefaultTTL: 6 * time.Second, MaxTTL: 6 * time.Second}}})
	out := filepath.Join(t.TempDir(), "db.json")
	ra := startAgent(t, "--broker", b.Addr, "--role", "short", "--out", out, "--overlap", "1s", "--replace-before", "3s")
	first := readJSON(t, waitFile(t, out, func(b []byte) bool { return len(b) > 0 }))

	b.RestartWithRoles(readOnly)
	select {
	case code := <-ra.exit:
		ra.exit <- code // for the cleanup
		if code != 1 {
			t.Fatalf("exit %d, want 1; log:\n%s", code, ra.logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the agent did not exit after its role was removed; log:\n%s", ra.logs.String())
	}
	logs := ra.logs.String()
	if !strings.Contains(logs, "NotFound") || strings.Count(logs, "level=ERROR") != 1 {
		t.Errorf("want one error line naming NotFound:\n%s", logs)
	}
	if ok, err := b.RoleExists(ctx, first.Username); err != nil || ok {
		t.Errorf("the user survived the agent's exit: %v %v", ok, err)
	}
	if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the credential file outlived its revoked user: %v", err)
	}
	assertNoPassword(t, logs, first.Password)
}

// TestAgentReplacesBeforeMaxTTL: on a role whose max TTL is a few seconds,
// the agent renders a fresh credential while the old lease is still
// active (make-before-break), and the template format renders it.
func TestAgentReplacesBeforeMaxTTL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := brokertest.Start(t, brokertest.Options{Roles: []brokertest.Role{{Name: "short", DefaultTTL: 6 * time.Second, MaxTTL: 6 * time.Second}}})
	dir := t.TempDir()
	tmpl := filepath.Join(dir, "pgpass.tmpl")
	if err := os.WriteFile(tmpl, []byte("{{.Host}}:{{.Port}}:{{.Database}}:{{.Username}}:{{.Password}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "pgpass")
	ra := startAgent(t, "--broker", b.Addr, "--role", "short", "--out", out, "--format", "template", "--template", tmpl,
		"--overlap", "2s", "--replace-before", "3s")
	waitFile(t, out, func(b []byte) bool { return len(b) > 0 })
	old, _, _ := ra.a.keeper.Current()

	admin, err := credbroker.Dial(b.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	repl, _ := ra.waitEvent(t, credbroker.EventReplaced, 20*time.Second)
	// observe runs after the file was rendered: the new credential is on
	// disk now. The old lease must still be alive at this point.
	content, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(content), ":"+repl.Lease.Username+":"+repl.Credential.Password+"\n") {
		t.Fatal("the rendered file does not hold the new credential")
	}
	l, err := admin.Lookup(ctx, old.ID)
	if err != nil {
		t.Fatal(err)
	}
	if l.State != credbroker.StateActive {
		t.Fatalf("the old lease was %v when its successor was rendered, want active", l.State)
	}
	if !time.Now().Before(old.MaxExpireTime) {
		t.Fatalf("the successor was rendered after the old lease's max expiry %v", old.MaxExpireTime)
	}
	ra.waitEvent(t, credbroker.EventRetired, 20*time.Second)
}

// TestAgentExecMode: the child gets the credential in its environment, is
// signalled on replacement, gets forwarded signals, and its exit code is the
// agent's.
func TestAgentExecMode(t *testing.T) {
	b := brokertest.Start(t, brokertest.Options{Roles: []brokertest.Role{{Name: "short", DefaultTTL: 4 * time.Second, MaxTTL: 4 * time.Second}}})
	dir := t.TempDir()
	marks := filepath.Join(dir, "marks")
	script := `echo "user=$PGUSER" >> "$MARKS"
trap 'echo hup >> "$MARKS"' HUP
trap 'echo term >> "$MARKS"; exit 7' TERM
while :; do sleep 0.05; done`
	t.Setenv("MARKS", marks)
	ra := startAgent(t, "--broker", b.Addr, "--role", "short", "--overlap", "1s", "--replace-before", "2s", "--", "/bin/sh", "-c", script)
	first := waitFile(t, marks, func(b []byte) bool { return strings.HasPrefix(string(b), "user=cb_short_") })
	lease, _, _ := ra.a.keeper.Current()
	if !strings.Contains(string(first), "user="+lease.Username+"\n") {
		t.Fatalf("the child saw %q, want user=%s", first, lease.Username)
	}
	ra.waitEvent(t, credbroker.EventReplaced, 20*time.Second)
	waitFile(t, marks, func(b []byte) bool { return strings.Contains(string(b), "hup\n") })

	ra.sigs <- syscall.SIGTERM
	select {
	case code := <-ra.exit:
		ra.exit <- code
		if code != 7 {
			t.Fatalf("agent exit code %d, want the child's 7", code)
		}
	case <-time.After(time.Minute):
		t.Fatal("the agent did not exit after its child")
	}
	waitFile(t, marks, func(b []byte) bool { return strings.Contains(string(b), "term\n") })
	cur, _, _ := ra.a.keeper.Current()
	if ok, err := b.RoleExists(context.Background(), cur.Username); err != nil || ok {
		t.Fatalf("the user survived the agent's exit: %v %v", ok, err)
	}
}

// TestAgentExecRestartOnReplace: with --on-replace restart the child is
// started again with the new credential in its environment.
func TestAgentExecRestartOnReplace(t *testing.T) {
	b := brokertest.Start(t, brokertest.Options{Roles: []brokertest.Role{{Name: "short", DefaultTTL: 4 * time.Second, MaxTTL: 4 * time.Second}}})
	marks := filepath.Join(t.TempDir(), "marks")
	t.Setenv("MARKS", marks)
	ra := startAgent(t, "--broker", b.Addr, "--role", "short", "--overlap", "1s", "--replace-before", "2s",
		"--on-replace", "restart", "--", "/bin/sh", "-c", `echo "user=$PGUSER" >> "$MARKS"; trap 'exit 0' TERM; while :; do sleep 0.05; done`)
	waitFile(t, marks, func(b []byte) bool { return strings.HasPrefix(string(b), "user=") })
	cur, _, _ := ra.a.keeper.Current()
	first := cur.Username
	repl, _ := ra.waitEvent(t, credbroker.EventReplaced, 20*time.Second)
	got := string(waitFile(t, marks, func(b []byte) bool { return strings.Contains(string(b), "user="+repl.Lease.Username+"\n") }))
	if !strings.HasPrefix(got, "user="+first+"\n") {
		t.Fatalf("child starts: %q; want %s, then %s", got, first, repl.Lease.Username)
	}
}

func TestConfigFileAndFlags(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "agent.yaml")
	yaml := `broker: 10.0.0.1:7450
role: read_only
ttl: 10m
overlap: 45s
replace_before: 2m
metadata: {app: web}
output: {path: /run/db.json, format: dsn}
exec: {command: [/app, --serve], on_replace: restart}
`
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig([]string{"--config", path, "--role", "updater", "--signal", "USR1"}, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.broker != "10.0.0.1:7450" || cfg.role != "updater" || cfg.ttl != 10*time.Minute || cfg.overlap != 45*time.Second || cfg.replaceBefore != 2*time.Minute ||
		cfg.format != "dsn" || cfg.outPath != "/run/db.json" || cfg.onReplace != "restart" || cfg.signal != syscall.SIGUSR1 ||
		len(cfg.command) != 2 || cfg.metadata["app"] != "web" {
		t.Fatalf("config %+v", cfg)
	}
	tlsCfg, err := parseConfig([]string{"--role", "r", "--out", "/x", "--tls-ca", "/ca.pem", "--token-file", "/tok"}, io.Discard, io.Discard)
	if err != nil || tlsCfg.tlsCA != "/ca.pem" || tlsCfg.tokenFile != "/tok" {
		t.Fatalf("tls flags: %+v, %v", tlsCfg, err)
	}
	if _, err := newAgent(tlsCfg, slog.New(slog.DiscardHandler)); err == nil {
		t.Error("newAgent with a missing CA file succeeded")
	}
	plain, _ := parseConfig([]string{"--role", "r", "--out", "/x", "--broker", "10.1.2.3:7450"}, io.Discard, io.Discard)
	if _, err := newAgent(plain, slog.New(slog.DiscardHandler)); err == nil {
		t.Error("plaintext to a non-loopback broker was allowed")
	}
	bad := [][]string{
		{"--out", "/x"}, // no role
		{"--role", "r"}, // nothing to do
		{"--role", "r", "--out", "/x", "--format", "xml"},
		{"--role", "r", "--out", "/x", "--format", "template"},
		{"--role", "r", "--out", "/x", "--ttl", "-1s"},
		{"--role", "r", "--out", "/x", "--signal", "KILL"},
		{"--role", "r", "--out", "/x", "--metadata", "novalue"},
		{"--config", filepath.Join(dir, "missing.yaml"), "--role", "r", "--out", "/x"},
	}
	for _, args := range bad {
		if _, err := parseConfig(args, io.Discard, io.Discard); err == nil {
			t.Errorf("parseConfig(%q) accepted", args)
		}
	}
	if code := run(context.Background(), []string{"--role", "r"}, nil, io.Discard, io.Discard); code != 2 {
		t.Errorf("run with a bad command line = %d, want 2", code)
	}
}

// TestAgentAcceptsFormerRotateSpellings: --rotate-before, --on-rotate,
// rotate_before and exec.on_rotate (from before "rotate" meant only the
// root credential) still work, the agent warns once about each, naming
// the new spelling, and refuses both spellings of one setting at once.
func TestAgentAcceptsFormerRotateSpellings(t *testing.T) {
	dir := t.TempDir()
	writeConfig := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	oldFile := writeConfig("old.yaml", "role: r\noutput: {path: /x}\nrotate_before: 4s\nexec: {on_rotate: none}\n")
	newFile := writeConfig("new.yaml", "role: r\noutput: {path: /x}\nreplace_before: 5s\nexec: {on_replace: signal}\n")
	for _, tc := range []struct {
		args      []string
		before    time.Duration
		onReplace string
		warnings  map[string]string // old spelling: new spelling
	}{
		{[]string{"--role", "r", "--out", "/x", "--rotate-before", "3s", "--on-rotate", "restart"}, 3 * time.Second, "restart",
			map[string]string{"--rotate-before": "--replace-before", "--on-rotate": "--on-replace"}},
		{[]string{"--config", oldFile}, 4 * time.Second, "none",
			map[string]string{"rotate_before": "replace_before", "exec.on_rotate": "exec.on_replace"}},
		// A former flag still overrides the file, as the new one does.
		{[]string{"--config", newFile, "--rotate-before", "3s"}, 3 * time.Second, "signal",
			map[string]string{"--rotate-before": "--replace-before"}},
		{[]string{"--config", oldFile, "--replace-before", "3s", "--on-replace", "restart"}, 3 * time.Second, "restart",
			map[string]string{"rotate_before": "replace_before", "exec.on_rotate": "exec.on_replace"}},
		{[]string{"--config", newFile}, 5 * time.Second, "signal", nil},
	} {
		cfg, err := parseConfig(tc.args, io.Discard, io.Discard)
		if err != nil {
			t.Errorf("parseConfig(%q): %v", tc.args, err)
			continue
		}
		if cfg.replaceBefore != tc.before || cfg.onReplace != tc.onReplace {
			t.Errorf("parseConfig(%q): replace before %v, on replace %q; want %v, %q", tc.args, cfg.replaceBefore, cfg.onReplace, tc.before, tc.onReplace)
		}
		logs := &syncBuffer{}
		a, err := newAgent(cfg, slog.New(slog.NewTextHandler(logs, nil)))
		if err != nil {
			t.Fatal(err)
		}
		a.client.Close()
		if n := strings.Count(logs.String(), "level=WARN"); n != len(tc.warnings) {
			t.Errorf("%q: %d warnings, want %d:\n%s", tc.args, n, len(tc.warnings), logs.String())
		}
		for old, repl := range tc.warnings {
			if line := "old=" + old + " new=" + repl + "\n"; strings.Count(logs.String(), line) != 1 {
				t.Errorf("%q: no single warning %q:\n%s", tc.args, line, logs.String())
			}
		}
	}

	both := writeConfig("both.yaml", "role: r\noutput: {path: /x}\nrotate_before: 4s\nreplace_before: 5s\n")
	bothExec := writeConfig("both-exec.yaml", "role: r\noutput: {path: /x}\nexec: {on_rotate: none, on_replace: none}\n")
	for _, args := range [][]string{
		{"--role", "r", "--out", "/x", "--rotate-before", "3s", "--replace-before", "3s"},
		{"--role", "r", "--out", "/x", "--on-rotate", "none", "--on-replace", "none"},
		{"--config", both},
		{"--config", bothExec},
	} {
		// Cancelled: were the arguments accepted, run would return at once
		// instead of waiting for a broker.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		var stderr strings.Builder
		if code := run(ctx, args, nil, io.Discard, &stderr); code != 2 || !strings.Contains(stderr.String(), "same setting") {
			t.Errorf("run(%q) = %d, %q; want 2 and a usage error", args, code, stderr.String())
		}
	}

	var help strings.Builder
	if code := run(context.Background(), []string{"--help"}, nil, &help, io.Discard); code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
	if h := help.String(); !strings.Contains(h, "--replace-before") || !strings.Contains(h, "--on-replace") ||
		strings.Contains(h, "rotate-before") || strings.Contains(h, "on-rotate") {
		t.Errorf("--help should list only the new spellings:\n%s", h)
	}
}

// TestVersion: --version names the build (package buildinfo) on stdout
// and exits 0, as brokerctl and brokerd do.
func TestVersion(t *testing.T) {
	var stdout, stderr strings.Builder
	if code := run(context.Background(), []string{"--version"}, nil, &stdout, &stderr); code != 0 {
		t.Fatalf("--version: exit %d, stderr %q", code, stderr.String())
	}
	if want := "broker-agent version " + buildinfo.Read().String() + "\n"; stdout.String() != want {
		t.Errorf("--version printed %q, want %q", stdout.String(), want)
	}
}

// TestCommandLineStyle: the agent's command line reads as brokerctl's and
// brokerd's: help on stdout, listing "--long" flags with their value
// names; single-dash long flags are a usage error (exit 2) that names the
// two-dash spelling; "--" and the first non-flag argument start the
// command; the environment fills in what neither flags nor file gave.
func TestCommandLineStyle(t *testing.T) {
	var help strings.Builder
	if code := run(context.Background(), []string{"--help"}, nil, &help, io.Discard); code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
	for _, want := range []string{
		"Usage:\n  broker-agent [flags] [-- command [args...]]\n",
		"\nFlags:\n",
		"      --config file ", "      --role role ", "      --ttl duration ",
		"      --metadata key=value ", "      --revoke-on-disconnect ", "  -h, --help ", "  -v, --version ",
	} {
		if !strings.Contains(help.String(), want) {
			t.Errorf("--help lacks %q:\n%s", want, help.String())
		}
	}

	var stderr strings.Builder
	if code := run(context.Background(), []string{"-role", "r", "--out", "/x"}, nil, io.Discard, &stderr); code != 2 ||
		!strings.Contains(stderr.String(), "--role") || !strings.Contains(stderr.String(), "--help") {
		t.Errorf("-role: exit %d, %q; want 2 and a hint at --role", code, stderr.String())
	}

	for _, args := range [][]string{
		{"--role", "r", "--", "/app", "--serve", "-x"},
		{"--role", "r", "/app", "--serve", "-x"},
	} {
		cfg, err := parseConfig(args, io.Discard, io.Discard)
		if err != nil || strings.Join(cfg.command, " ") != "/app --serve -x" {
			t.Errorf("parseConfig(%q) = %+v, %v; want the command /app --serve -x", args, cfg, err)
		}
	}

	t.Setenv("CREDBROKER_ADDR", "unix:/run/credbroker.sock")
	t.Setenv("CREDBROKER_TOKEN_FILE", "/env/token")
	cfg, err := parseConfig([]string{"--role", "r", "--out", "/x"}, io.Discard, io.Discard)
	if err != nil || cfg.broker != "unix:/run/credbroker.sock" || cfg.tokenFile != "/env/token" {
		t.Errorf("environment fallbacks: %+v, %v", cfg, err)
	}
	cfg, err = parseConfig([]string{"--role", "r", "--out", "/x", "--broker", "127.0.0.1:1", "--token-file", "/flag/token"}, io.Discard, io.Discard)
	if err != nil || cfg.broker != "127.0.0.1:1" || cfg.tokenFile != "/flag/token" {
		t.Errorf("flags over the environment: %+v, %v", cfg, err)
	}
}

func TestRenderIsAtomicAnd0600(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "cred")
	d := templateData{Username: "u", Password: "p'w", Host: "h", Port: 5432, Database: "db", DSN: "postgres://u:p@h/db?sslmode=disable", LeaseID: "l"}
	for _, format := range []string{"json", "env", "dsn"} {
		r := &renderer{path: out, format: format}
		if err := os.WriteFile(out, []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := r.render(d); err != nil {
			t.Fatalf("%s: %v", format, err)
		}
		fi, err := os.Stat(out)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v, %v", format, fi.Mode().Perm(), err)
		}
		b, _ := os.ReadFile(out)
		switch format {
		case "json":
			if readJSON(t, b).Password != "p'w" {
				t.Errorf("json: %s", b)
			}
		case "env":
			if !strings.Contains(string(b), `PGPASSWORD='p'\''w'`+"\n") || !strings.Contains(string(b), "PGPORT=5432\n") {
				t.Errorf("env: %s", b)
			}
		case "dsn":
			if string(b) != d.DSN+"\n" {
				t.Errorf("dsn: %s", b)
			}
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left behind: %d entries", len(entries))
	}
}
