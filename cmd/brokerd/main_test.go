package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/internal/buildinfo"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server/daemon"
	"github.com/credbroker/credbroker/store"
)

func TestMain(m *testing.M) {
	// The kill -9 test re-executes this binary as a real brokerd process.
	if os.Getenv(childEnv) == "1" {
		main()
	}
	os.Exit(pgtest.Main(m))
}

type syncBuffer = syncbuf.Buffer

// shortTempDir is a temporary directory with a path short enough for a
// unix socket (sun_path is 108 bytes; t.TempDir can be longer).
func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "cbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

type testConfig struct {
	path, dir, storePath string
	target               *pgtest.Target
}

// writeConfig writes a configuration for a fresh pgtest target with one
// broker role, read_only, whose proxy role is proxyRole ("" means the
// target's own read_only proxy role).
func writeConfig(t *testing.T, listen string, proxyRole string) testConfig {
	t.Helper()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	if proxyRole == "" {
		proxyRole = tg.ProxyRoles["read_only"]
	}
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := testConfig{path: filepath.Join(dir, "credbroker.yaml"), dir: dir, storePath: filepath.Join(dir, "leases.db"), target: tg}
	yml := fmt.Sprintf(`listen: %q
store:
  path: leases.db
targets:
  - name: main
    url: %q
    password_file: admin.password
    marker_role: %s
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 15m, max_ttl: 1h}
shutdown_timeout: 5s
dsn_sslmode: disable
`, listen, tg.AdminURL, tg.MarkerRole, proxyRole)
	if err := os.WriteFile(c.path, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

func brokerd(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code = run(ctx, args, &out, &errOut)
	return out.String(), errOut.String(), code
}

// waitServing polls gRPC health until the server reports SERVING.
func waitServing(t *testing.T, conn *grpc.ClientConn) {
	t.Helper()
	hc := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("brokerd never reported SERVING: %v %v", resp, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func dial(t *testing.T, target string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestServeAndShutdown runs `brokerd --config` on a unix socket, issues a
// credential, keeps a KeepAlive stream open, and stops brokerd the way
// SIGTERM does (its context ends): it exits 0, ends the stream, removes
// the socket and releases the store.
func TestServeAndShutdown(t *testing.T) {
	sock := filepath.Join(shortTempDir(t), "cb.sock")
	c := writeConfig(t, "unix:"+sock, "")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"--config", c.path}, &stdout, &stderr) }()

	conn := dial(t, "unix:"+sock)
	waitServing(t, conn)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode: %v %v", fi.Mode(), err)
	}

	callCtx, callCancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer callCancel()
	resp, err := credbrokerv1.NewCredentialServiceClient(conn).IssueCredential(callCtx, &credbrokerv1.IssueCredentialRequest{Role: "read_only"})
	if err != nil {
		t.Fatal(err)
	}
	pw := resp.GetCredential().GetPassword()
	pc, err := pgx.Connect(callCtx, resp.GetCredential().GetDsn())
	if err != nil {
		t.Fatalf("login with the issued dsn: %v", err)
	}
	pc.Close(callCtx)

	stream, err := credbrokerv1.NewCredentialServiceClient(conn).KeepAlive(callCtx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&credbrokerv1.KeepAliveRequest{LeaseId: resp.GetLease().GetId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	cancel() // what SIGTERM does
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit %d; stderr:\n%s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("brokerd did not stop")
	}
	// The open stream did not hold shutdown up for shutdown_timeout.
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("shutdown took %v", d)
	}
	for {
		if _, err := stream.Recv(); err != nil {
			break // ended by the drain
		}
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	s, err := store.Open(c.storePath, store.Options{Timeout: 100 * time.Millisecond})
	if err != nil {
		t.Errorf("store still locked after shutdown: %v", err)
	} else {
		s.Close()
	}

	logs := stderr.String()
	for _, want := range []string{"msg=serving", `msg="shutting down"`, "password_source=\"file " + filepath.Join(c.dir, "admin.password")} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
	for _, secret := range []string{pw, c.target.AdminPassword} {
		if strings.Contains(logs, secret) || strings.Contains(stdout.String(), secret) {
			t.Errorf("a password was logged:\n%s", logs)
		}
	}
}

func TestRefusesNonLoopbackPlaintext(t *testing.T) {
	c := writeConfig(t, "0.0.0.0:7450", "")
	_, stderr, code := brokerd(t, "--config", c.path)
	want := "listen 0.0.0.0:7450: plaintext gRPC is only allowed on loopback or a unix socket; configure tls (cert_file, key_file) or listen on 127.0.0.1"
	if code != 1 || !strings.Contains(stderr, want) {
		t.Errorf("exit %d, stderr:\n%s", code, stderr)
	}
}

func TestListenAddressInUse(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	c := writeConfig(t, held.Addr().String(), "")
	_, stderr, code := brokerd(t, "run", "--config", c.path)
	if code != 1 || !strings.Contains(stderr, "listen "+held.Addr().String()+": address already in use") {
		t.Errorf("exit %d, stderr:\n%s", code, stderr)
	}
}

func TestCommandLineAndConfigErrors(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("listen: 127.0.0.1:7450\nstore: {path: x.db}\ntargets: []\nroles:\n  - {name: Bad, target: nope, proxy_role: r, default_ttl: 2h, max_ttl: 1h}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args   []string
		code   int
		stderr []string
	}{
		{nil, 2, []string{"--config FILE is required (or try: brokerd dev)"}},
		{[]string{"run"}, 2, []string{"--config FILE is required"}},
		{[]string{"--bogus"}, 2, []string{"unknown flag: --bogus"}},
		{[]string{"serve"}, 2, []string{`unknown command "serve"`}},
		{[]string{"--config", "/nonexistent/credbroker.yaml"}, 1, []string{"no such file or directory"}},
		{[]string{"--config", bad}, 1, []string{
			"brokerd: config " + bad + ":\n",
			"\n  targets: at least one target is required",
			"\n  roles[0].name: \"Bad\" must match",
			"\n  roles[0].target: unknown target \"nope\"",
			"\n  roles[0].default_ttl: 2h exceeds max_ttl 1h",
		}},
		{[]string{"check", "--config", bad}, 1, []string{"roles[0].target: unknown target"}},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, stderr, code := brokerd(t, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d; stderr:\n%s", code, tc.code, stderr)
			}
			for _, w := range tc.stderr {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
		})
	}
}

func TestCheck(t *testing.T) {
	c := writeConfig(t, "127.0.0.1:7450", "")
	stdout, stderr, code := brokerd(t, "check", "--config", c.path, "--connect")
	if code != 0 || !strings.Contains(stdout, ": ok (1 target(s), 1 role(s))") {
		t.Errorf("check --connect: exit %d\n%s%s", code, stdout, stderr)
	}
	if _, err := os.Stat(c.storePath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("check created the store: %v", err)
	}

	missing := writeConfig(t, "127.0.0.1:7450", "cbt_no_such_proxy")
	if _, _, code := brokerd(t, "check", "--config", missing.path); code != 0 {
		t.Errorf("check without --connect looked at the database")
	}
	_, stderr, code = brokerd(t, "check", "--config", missing.path, "--connect")
	if code != 1 || !strings.Contains(stderr, `roles[0].proxy_role: target main: postgres: proxy role "cbt_no_such_proxy" does not exist`) {
		t.Errorf("check --connect with a missing proxy role: exit %d\n%s", code, stderr)
	}
}

// TestDev runs `brokerd dev` end to end: each demo role gets exactly its
// proxy role's privileges, and stopping removes every temporary file.
func TestDev(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own PostgreSQL cluster")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	ready := make(chan *devSession, 1)
	done := make(chan error, 1)
	go func() {
		done <- runDev(ctx, "127.0.0.1:0", "127.0.0.1:0", &stdout, &stderr, func(s *devSession) { ready <- s })
	}()
	var s *devSession
	select {
	case s = <-ready:
	case err := <-done:
		t.Fatalf("brokerd dev failed: %v\n%s", err, stderr.String())
	case <-time.After(2 * time.Minute):
		t.Fatalf("brokerd dev not ready:\n%s", stderr.String())
	}

	walk := stdout.String()
	for _, want := range []string{"credbroker dev is ready", "brokerctl --addr " + s.Listen + " issue read_only", `psql "<dsn>"`, "leases", "revoke <lease_id>", "Ctrl-C"} {
		if !strings.Contains(walk, want) {
			t.Errorf("walk-through lacks %q:\n%s", want, walk)
		}
	}
	// The Vault walk-through: its curl works as printed.
	curl := fmt.Sprintf(`curl -s -H "X-Vault-Token: %s" %s/v1/database/creds/read_only`, devVaultToken, s.VaultAddr)
	for _, want := range []string{curl, fmt.Sprintf("VAULT_ADDR=%s VAULT_TOKEN=%s go run ./examples/vault-client read_only", s.VaultAddr, devVaultToken)} {
		if s.VaultAddr == "" || !strings.Contains(walk, want) {
			t.Errorf("walk-through lacks %q:\n%s", want, walk)
		}
	}
	if s.VaultAddr != "" {
		req, err := http.NewRequest("GET", s.VaultAddr+"/v1/database/creds/read_only", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("X-Vault-Token", devVaultToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"lease_id":"database/creds/read_only/`) {
			t.Errorf("the walk-through's curl: %s %s", resp.Status, body)
		}
	}
	pwFile := filepath.Join(s.Dir, devAdmin+".password")
	if fi, err := os.Stat(pwFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("admin password file: %v %v", fi.Mode(), err)
	}

	conn := dial(t, "passthrough:///"+s.Listen)
	client := credbrokerv1.NewCredentialServiceClient(conn)
	callCtx, callCancel := context.WithTimeout(context.Background(), time.Minute)
	defer callCancel()
	// Each role: statements its proxy role allows and one it does not.
	tests := []struct {
		role     string
		allowed  []string
		denied   string
		ttl, max time.Duration
	}{
		{"read_only", []string{"SELECT count(*) FROM important_table"}, "SELECT count(*) FROM user_table", 15 * time.Minute, time.Hour},
		{"updater", []string{"SELECT count(*) FROM user_table", "INSERT INTO user_table (email, display_name) VALUES ('new@example.com', 'New')", "UPDATE user_table SET display_name = 'Ada L.' WHERE email = 'ada@example.com'"}, "DELETE FROM user_table", 15 * time.Minute, time.Hour},
		{"admin", []string{"INSERT INTO logs_table (level, message) VALUES ('info', 'x')", "DELETE FROM logs_table WHERE level = 'debug'", "TRUNCATE logs_table"}, "SELECT count(*) FROM important_table", 5 * time.Minute, 15 * time.Minute},
	}
	for _, tc := range tests {
		resp, err := client.IssueCredential(callCtx, &credbrokerv1.IssueCredentialRequest{Role: tc.role})
		if err != nil {
			t.Fatalf("issue %s: %v", tc.role, err)
		}
		l := resp.GetLease()
		if got := l.GetExpireTime().AsTime().Sub(l.GetIssueTime().AsTime()); got != tc.ttl {
			t.Errorf("%s: ttl %v, want %v", tc.role, got, tc.ttl)
		}
		if got := l.GetMaxExpireTime().AsTime().Sub(l.GetIssueTime().AsTime()); got != tc.max {
			t.Errorf("%s: max ttl %v, want %v", tc.role, got, tc.max)
		}
		pc, err := pgx.Connect(callCtx, resp.GetCredential().GetDsn())
		if err != nil {
			t.Fatalf("%s: login: %v", tc.role, err)
		}
		for _, q := range tc.allowed {
			if _, err := pc.Exec(callCtx, q); err != nil {
				t.Errorf("%s: %s: %v", tc.role, q, err)
			}
		}
		if _, err := pc.Exec(callCtx, tc.denied); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("%s: %s: %v, want permission denied", tc.role, tc.denied, err)
		}
		pc.Close(callCtx)
	}
	// The broker's admin is not a superuser.
	var super bool
	su, err := pgx.Connect(callCtx, s.Cluster.SuperuserURL(devDatabase))
	if err != nil {
		t.Fatal(err)
	}
	if err := su.QueryRow(callCtx, "SELECT rolsuper FROM pg_roles WHERE rolname = $1", devAdmin).Scan(&super); err != nil || super {
		t.Errorf("broker_admin superuser=%v (%v)", super, err)
	}
	su.Close(callCtx)

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("brokerd dev: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("brokerd dev did not stop")
	}
	for _, p := range []string{s.Dir, s.Cluster.DataDir} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
	if !strings.Contains(stderr.String(), `msg="revoked leases at shutdown" count=4`) {
		t.Errorf("leases not revoked at shutdown:\n%s", stderr.String())
	}
}

func TestDevListenTaken(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	start := time.Now()
	var stdout, stderr bytes.Buffer
	err = runDev(context.Background(), held.Addr().String(), "", &stdout, &stderr, nil)
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v: a cluster was started before the port was checked", d)
	}
	if _, _, code := brokerd(t, "dev", "--listen", "0.0.0.0:7450"); code != 1 {
		t.Errorf("dev --listen 0.0.0.0:7450: exit %d", code)
	}
}

func TestDevWithoutPostgres(t *testing.T) {
	t.Setenv("CREDBROKER_PG_BINDIR", t.TempDir()) // a directory without initdb
	_, stderr, code := brokerd(t, "dev", "--listen", "127.0.0.1:0")
	for _, want := range []string{"dev needs PostgreSQL's server binaries", "apt-get install postgresql", "`make dev` installs Debian's postgresql package"} {
		if code != 1 || !strings.Contains(stderr, want) {
			t.Errorf("exit %d, stderr lacks %q:\n%s", code, want, stderr)
		}
	}
}

// TestListenUnixSocket: a socket left by a killed brokerd is replaced; one
// that answers, or a file that is not a socket, is not touched.
func TestListenUnixSocket(t *testing.T) {
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "cb.sock")

	live, err := daemon.Listen("unix:"+sock, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := daemon.Listen("unix:"+sock, false); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("second listen on a live socket: %v", err)
	}
	// A killed process leaves its socket file behind.
	live.(*net.UnixListener).SetUnlinkOnClose(false)
	live.Close()
	if _, err := os.Stat(sock); err != nil {
		t.Fatal(err)
	}
	again, err := daemon.Listen("unix:"+sock, false)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	again.Close()

	file := filepath.Join(dir, "not-a-socket")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := daemon.Listen("unix:"+file, false); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Errorf("listen on a regular file: %v", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Errorf("the regular file was touched: %q %v", b, err)
	}
}

// TestVersion: --version names the build (package buildinfo) and exits 0.
func TestVersion(t *testing.T) {
	out, _, code := brokerd(t, "--version")
	if code != 0 || !strings.HasPrefix(out, "brokerd version ") || !strings.Contains(out, buildinfo.Read().String()) {
		t.Errorf("--version: exit %d, %q", code, out)
	}
}
