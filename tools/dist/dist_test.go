package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// release is the release under test: `make dist-test` builds one with
// tools/release and names it in CREDBROKER_RELEASE_DIR,
// CREDBROKER_RELEASE_VERSION and CREDBROKER_RELEASE_COMMIT (the commit it
// was built from, which HEAD may have left since). Without them the tests skip (fail under
// CI=true): building six binaries is make's job, not each test's.
func release(t *testing.T) Options {
	t.Helper()
	dir, version := os.Getenv("CREDBROKER_RELEASE_DIR"), os.Getenv("CREDBROKER_RELEASE_VERSION")
	if dir == "" || version == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("CREDBROKER_RELEASE_DIR and CREDBROKER_RELEASE_VERSION are not set: run make dist-test")
		}
		t.Skip("CREDBROKER_RELEASE_DIR and CREDBROKER_RELEASE_VERSION are not set: run make dist-test")
	}
	o := Options{Version: version, Root: "../..", Release: dir, Out: t.TempDir()}
	if err := o.complete(); err != nil {
		t.Fatal(err)
	}
	if c := os.Getenv("CREDBROKER_RELEASE_COMMIT"); c != "" {
		o.Commit = c
	}
	return o
}

// exampleConfig is deploy/debian/credbroker.yaml (the package's
// /etc/credbroker/credbroker.yaml and the chart's default) pointed at a
// throwaway target: every replaced line must be there, so the example
// cannot drift from what the tests run.
func exampleConfig(t *testing.T, text string, tg *pgtest.Target, listen string) string {
	t.Helper()
	for _, r := range [][2]string{
		{"listen: 127.0.0.1:7450", "listen: " + listen},
		{"url: postgres://broker_admin@127.0.0.1:5432/app", "url: " + tg.AdminURL + "\n    marker_role: " + tg.MarkerRole},
		{"proxy_role: read_only_role ", "proxy_role: " + tg.ProxyRoles["read_only"] + " "},
	} {
		if !strings.Contains(text, r[0]) {
			t.Fatalf("the example configuration has no %q", r[0])
		}
		text = strings.Replace(text, r[0], r[1], 1)
	}
	return text
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startBrokerd starts cmd (a brokerd), stops it at the end of the test,
// and waits until it serves gRPC health at addr.
func startBrokerd(t *testing.T, cmd *exec.Cmd, addr string) {
	t.Helper()
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("brokerd output:\n%s", out.String())
		}
	})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Watch streams the serving status as it changes: no polling loop.
	for {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("brokerd exited before serving: %v\n%s", err, out.String())
		default:
		}
		stream, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		if err != nil {
			t.Fatalf("health watch: %v\n%s", err, out.String())
		}
		for {
			resp, err := stream.Recv()
			if err != nil {
				if ctx.Err() != nil {
					t.Fatalf("brokerd never served at %s: %v\n%s", addr, err, out.String())
				}
				break // the stream broke before serving: watch again
			}
			if resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
				return
			}
		}
	}
}

// issueAndLogin issues a read_only credential with brokerctl (the
// command brokerctl(args...) returns) and logs in with it.
func issueAndLogin(t *testing.T, brokerctl func(args ...string) *exec.Cmd, addr string, tg *pgtest.Target) {
	t.Helper()
	cmd := brokerctl("--addr", addr, "--json", "issue", "read_only", "--ttl", "5m")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.Bytes())
	}
	var resp struct {
		Lease      struct{ ID, Role, State string }
		Credential struct{ Username, Password, Dsn string }
	}
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("brokerctl issue printed %q: %v", out, err)
	}
	if resp.Lease.Role != "read_only" || resp.Lease.State != "LEASE_STATE_ACTIVE" || resp.Credential.Password == "" {
		t.Fatalf("brokerctl issue: lease %+v, user %q", resp.Lease, resp.Credential.Username)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, tg.URL(resp.Credential.Username, resp.Credential.Password))
	if err != nil {
		t.Fatalf("log in as the issued user %s: %v", resp.Credential.Username, err)
	}
	defer conn.Close(ctx)
	var user string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
		t.Fatal(err)
	}
	if user != tg.ProxyRoles["read_only"] {
		t.Fatalf("the issued user acts as %q, want the proxy role %q", user, tg.ProxyRoles["read_only"])
	}
	t.Logf("issued %s (lease %s), logged in, acting as %s", resp.Credential.Username, resp.Lease.ID, user)
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func mustExist(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			t.Error(err)
		}
	}
}
