package server

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store"
)

// These tests need no broker: they cover the wiring and the interceptors.

func dial(t *testing.T, gs *grpc.Server) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 16)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func TestServerWithoutBroker(t *testing.T) {
	if err := (Config{}).Validate(); err == nil {
		t.Error("Validate accepts a Config without a Broker")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A misconfigured server still starts and says so, rather than panicking.
	conn := dial(t, NewGRPCServer(Config{SSLMode: "bogus", MaxStreamLeases: -1}))
	_, err := pb.NewCredentialServiceClient(conn).IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "x"})
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("IssueCredential without a broker: %v, want Unimplemented", err)
	}
	hc := healthpb.NewHealthClient(conn)
	for svc, want := range map[string]healthpb.HealthCheckResponse_ServingStatus{
		"": healthpb.HealthCheckResponse_SERVING,
		pb.CredentialService_ServiceDesc.ServiceName: healthpb.HealthCheckResponse_NOT_SERVING,
		pb.AdminService_ServiceDesc.ServiceName:      healthpb.HealthCheckResponse_NOT_SERVING,
	} {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != want {
			t.Errorf("health %q = %v, %v; want %v", svc, resp, err, want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "leases.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	b, err := broker.New(broker.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		cfg Config
		ok  bool
	}{
		{Config{Broker: b}, true},
		{Config{Broker: b, SSLMode: "verify-full", MaxStreamLeases: 10}, true},
		{Config{}, false},
		{Config{Broker: b, SSLMode: "nope"}, false},
		{Config{Broker: b, MaxStreamLeases: -1}, false},
	} {
		if err := tc.cfg.Validate(); (err == nil) != tc.ok {
			t.Errorf("Validate(%+v) = %v, want ok=%v", tc.cfg, err, tc.ok)
		}
	}
}

func TestLocalAuthenticatorIdentity(t *testing.T) {
	c := &core{authn: LocalAuthenticator{}, authz: OwnerAuthorizer{}, log: discardLogger()}
	var got Identity
	var ok bool
	_, err := c.unaryAuth(context.Background(), nil,
		&grpc.UnaryServerInfo{FullMethod: "/credbroker.v1.AdminService/ListRoles"},
		func(ctx context.Context, _ any) (any, error) {
			got, ok = IdentityFrom(ctx)
			return nil, nil
		})
	if err != nil || !ok || got != (Identity{Name: "local", Admin: true}) {
		t.Errorf("identity = %+v, %v, %v", got, ok, err)
	}
	if _, ok := IdentityFrom(context.Background()); ok {
		t.Error("IdentityFrom finds an identity in an empty context")
	}
}

type failingAuthenticator struct{}

func (failingAuthenticator) Authenticate(context.Context) (Identity, error) {
	return Identity{}, status.Error(codes.Internal, "no client certificate")
}

func TestAuthenticationFailureIsUnauthenticated(t *testing.T) {
	c := &core{authn: failingAuthenticator{}, authz: OwnerAuthorizer{}, log: discardLogger()}
	called := false
	_, err := c.unaryAuth(context.Background(), nil,
		&grpc.UnaryServerInfo{FullMethod: "/credbroker.v1.CredentialService/LookupLease"},
		func(context.Context, any) (any, error) { called = true; return nil, nil })
	if called || status.Code(err) != codes.Unauthenticated || status.Convert(err).Message() != "no client certificate" {
		t.Errorf("err = %v, handler called = %v", err, called)
	}
	// Health probes carry no credentials and are let through.
	_, err = c.unaryAuth(context.Background(), nil,
		&grpc.UnaryServerInfo{FullMethod: "/grpc.health.v1.Health/Check"},
		func(context.Context, any) (any, error) { called = true; return nil, nil })
	if err != nil || !called {
		t.Errorf("health: err = %v, handler called = %v", err, called)
	}
}

func TestPanicBecomesInternal(t *testing.T) {
	buf := &syncBuffer{}
	c := &core{log: newTextLogger(buf)}
	_, err := c.unaryRecover(context.Background(), nil,
		&grpc.UnaryServerInfo{FullMethod: "/credbroker.v1.CredentialService/LookupLease"},
		func(context.Context, any) (any, error) { panic("boom") })
	if status.Code(err) != codes.Internal || status.Convert(err).Message() != internalMessage {
		t.Errorf("unary panic: %v", err)
	}
	err = c.streamRecover(nil, &contextStream{ctx: context.Background()}, &grpc.StreamServerInfo{FullMethod: "/credbroker.v1.CredentialService/KeepAlive"},
		func(any, grpc.ServerStream) error { panic("boom") })
	if status.Code(err) != codes.Internal {
		t.Errorf("stream panic: %v", err)
	}
	if !strings.Contains(buf.String(), "panic=boom") {
		t.Errorf("panic not logged:\n%s", buf.String())
	}
}
