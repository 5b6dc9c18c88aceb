package daemon

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/internal/pgtest"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// tcpProxy forwards connections on a local port to the PostgreSQL server:
// the target "comes up" when it starts listening. Until then the port is
// closed and connecting to it is refused.
type tcpProxy struct {
	addr     string // 127.0.0.1:port, reserved and closed
	upstream string
	mu       sync.Mutex
	lis      net.Listener
	conns    []net.Conn
}

func newTCPProxy(t *testing.T, upstream string) *tcpProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{addr: l.Addr().String(), upstream: upstream}
	l.Close()
	t.Cleanup(p.close)
	return p
}

func (p *tcpProxy) start(t *testing.T) {
	t.Helper()
	l, err := net.Listen("tcp", p.addr)
	if err != nil {
		t.Fatalf("the proxy's port was taken meanwhile: %v", err)
	}
	p.mu.Lock()
	p.lis = l
	p.mu.Unlock()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.upstream)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
}

func (p *tcpProxy) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.lis != nil {
		p.lis.Close()
	}
	for _, c := range p.conns {
		c.Close()
	}
}

// A target down at start-up: brokerd starts and serves the other target,
// the down one answers Unavailable and reports NOT_SERVING on its health
// service, and once it answers it is connected and issues, without a
// restart.
func TestStartsWithATargetDownAndConnectsItWhenBack(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srv := pgtest.Server(t)
	up := srv.NewTarget(t, pgtest.TargetOptions{})
	down := srv.NewTarget(t, pgtest.TargetOptions{})
	pgURL, err := url.Parse(down.AdminURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newTCPProxy(t, pgURL.Host)
	pgURL.Host = proxy.addr
	downURL := pgURL.String()

	dir := t.TempDir()
	writePW := func(name, pw string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(pw+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	yaml := fmt.Sprintf(`listen: 127.0.0.1:0
store: {path: %q}
targets:
  - {name: up, url: %q, password_file: %q, marker_role: %s, connect_timeout: 5s}
  - {name: down, url: %q, password_file: %q, marker_role: %s, connect_timeout: 5s}
roles:
  - {name: ro_up, target: up, proxy_role: %s, default_ttl: 1m, max_ttl: 5m}
  - {name: ro_down, target: down, proxy_role: %s, default_ttl: 1m, max_ttl: 5m}
`, filepath.Join(dir, "leases.db"),
		up.AdminURL, writePW("up.pw", up.AdminPassword), up.MarkerRole,
		downURL, writePW("down.pw", down.AdminPassword), down.MarkerRole,
		up.ProxyRoles["read_only"], down.ProxyRoles["read_only"])
	d, err := Start(ctx, parseConfig(t, yaml), testOptions())
	if err != nil {
		t.Fatalf("Start with one target down: %v", err)
	}
	defer d.Close()
	serveCtx, stopServing := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- d.Serve(serveCtx) }()
	defer func() { stopServing(); <-served }()
	<-d.Ready()

	conn, err := grpc.NewClient(d.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	creds := pb.NewCredentialServiceClient(conn)
	health := healthpb.NewHealthClient(conn)
	healthOf := func(service string) healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		r, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatalf("health %q: %v", service, err)
		}
		return r.GetStatus()
	}
	for service, want := range map[string]healthpb.HealthCheckResponse_ServingStatus{
		"":                          healthpb.HealthCheckResponse_SERVING,
		TargetHealthService("up"):   healthpb.HealthCheckResponse_SERVING,
		TargetHealthService("down"): healthpb.HealthCheckResponse_NOT_SERVING,
	} {
		if got := healthOf(service); got != want {
			t.Errorf("health %q = %v, want %v", service, got, want)
		}
	}

	if _, err := creds.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "ro_up"}); err != nil {
		t.Errorf("issue on the target that is up: %v", err)
	}
	_, err = creds.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "ro_down"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("issue on the target that is down: %v, want Unavailable", err)
	}
	if strings.Contains(err.Error(), down.AdminPassword) {
		t.Errorf("the error holds the admin password: %v", err)
	}

	// The target comes up: the first issues may still find it down; it is
	// connected without a restart.
	proxy.start(t)
	var resp *pb.IssueCredentialResponse
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err = creds.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "ro_down"})
		if err == nil || status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(50 * time.Millisecond): // polling a condition, with a deadline
		}
	}
	if err != nil {
		t.Fatalf("issue once the target is back: %v", err)
	}
	if got := healthOf(TargetHealthService("down")); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health of the target once connected = %v, want SERVING", got)
	}
	c := resp.GetCredential()
	if c.GetPort() == 0 || net.JoinHostPort(c.GetHost(), fmt.Sprint(c.GetPort())) != proxy.addr {
		t.Errorf("credential endpoint %s:%d, want the target's %s", c.GetHost(), c.GetPort(), proxy.addr)
	}
	login, err := pgx.Connect(ctx, down.URL(c.GetUsername(), c.GetPassword()))
	if err != nil {
		t.Fatalf("logging in with the credential: %v", err)
	}
	login.Close(ctx)
}
