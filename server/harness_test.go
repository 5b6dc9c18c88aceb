package server

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/fakeclock"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store"
)

// Test identities travel in metadata, read by headerAuthenticator: the
// seam a bearer-token authenticator will use.
const (
	identityHeader = "x-test-identity"
	adminHeader    = "x-test-admin"
)

// headerAuthenticator trusts the identity a test puts in the metadata.
type headerAuthenticator struct{}

func (headerAuthenticator) Authenticate(ctx context.Context) (Identity, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	names := md.Get(identityHeader)
	if len(names) != 1 || names[0] == "" {
		return Identity{}, errors.New("missing " + identityHeader)
	}
	admin := md.Get(adminHeader)
	return Identity{Name: names[0], Admin: len(admin) == 1 && admin[0] == "true"}, nil
}

// as returns ctx calling as the named identity.
func as(ctx context.Context, name string, admin bool) context.Context {
	return metadata.AppendToOutgoingContext(ctx, identityHeader, name, adminHeader, strconv.FormatBool(admin))
}

type syncBuffer = syncbuf.Buffer

// harness is one broker on its own PostgreSQL target and bbolt file,
// served over an in-process gRPC connection.
type harness struct {
	target  *pgtest.Target
	engine  *postgres.Engine
	broker  *broker.Broker
	drainer *Drainer
	logs    *syncBuffer // server and broker logs, to check for secrets
	conn    *grpc.ClientConn
	cred    pb.CredentialServiceClient
	admin   pb.AdminServiceClient
}

// Roles the harness configures, on the target's proxy roles.
const (
	roleReadOnly = "read_only"
	roleShort    = "short" // max TTL of one minute, to reach it in a test
)

// harnessOptions change the harness's defaults.
type harnessOptions struct {
	clock           broker.Clock // nil: the real clock
	maxStreamLeases int
	// maxKeepAliveLeases and maxPendingRenewals: 0 is the default.
	maxKeepAliveLeases int
	maxPendingRenewals int
	renewBatches       int                                       // broker.Config.RenewBatches; 0: its default
	wrapDB             func(broker.Database) broker.Database     // nil: the engine as is
	wrapStore          func(broker.LeaseStore) broker.LeaseStore // nil: the bbolt store as is
	storeDir           string                                    // where the bbolt file goes; "": t.TempDir()
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	return newHarnessWith(t, harnessOptions{})
}

func newHarnessWith(t *testing.T, o harnessOptions) *harness {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	h := &harness{logs: &syncBuffer{}}
	logger := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))

	h.target = pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	engCfg := h.target.EngineConfig()
	engCfg.Logger = logger
	eng, err := postgres.New(ctx, engCfg)
	if err != nil {
		t.Fatalf("postgres.New: %v", err)
	}
	t.Cleanup(eng.Close)
	h.engine = eng

	if o.storeDir == "" {
		o.storeDir = t.TempDir()
	}
	st, err := store.Open(filepath.Join(o.storeDir, "leases.db"), store.Options{})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })

	var ls broker.LeaseStore = st
	if o.wrapStore != nil {
		ls = o.wrapStore(st)
	}
	readOnly := h.target.ProxyRoles["read_only"]
	var db broker.Database = eng
	if o.wrapDB != nil {
		db = o.wrapDB(eng)
	}
	b, err := broker.New(broker.Config{
		Store:        ls,
		Databases:    map[string]broker.Database{"main": db},
		RenewBatches: o.renewBatches,
		Roles: []broker.Role{
			{Name: roleReadOnly, Target: "main", ProxyRole: readOnly, DefaultTTL: 10 * time.Minute, MaxTTL: time.Hour},
			{Name: roleShort, Target: "main", ProxyRole: readOnly, DefaultTTL: time.Minute, MaxTTL: time.Minute},
		},
		Clock:  o.clock,
		Logger: logger,
	})
	if err != nil {
		t.Fatalf("broker.New: %v", err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatalf("broker.Start: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	h.broker = b

	h.drainer = NewDrainer()
	gs := NewGRPCServer(Config{
		Broker:        b,
		Authenticator: headerAuthenticator{},
		Logger:        logger,
		Endpoints:     map[string]broker.Endpoint{"main": eng.Endpoint()},
		SSLMode:       "disable",
		Drainer:       h.drainer,
		// 0 is the default.
		MaxStreamLeases:    o.maxStreamLeases,
		MaxKeepAliveLeases: o.maxKeepAliveLeases,
		MaxPendingRenewals: o.maxPendingRenewals,
	})
	lis := bufconn.Listen(1 << 20)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop) // registered last, runs first: no call outlives the broker

	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	h.conn = conn
	h.cred = pb.NewCredentialServiceClient(conn)
	h.admin = pb.NewAdminServiceClient(conn)
	return h
}

// issue issues a credential for role as client, failing the test on error.
func (h *harness) issue(t *testing.T, ctx context.Context, client, role string) *pb.IssueCredentialResponse {
	t.Helper()
	resp, err := h.cred.IssueCredential(as(ctx, client, false), &pb.IssueCredentialRequest{Role: role})
	if err != nil {
		t.Fatalf("IssueCredential(%s as %s): %v", role, client, err)
	}
	return resp
}

// advanceUntil advances clock by d, then by a second each time a loop
// waits on it again (at most ten times, in case a loop was busy at the
// first tick), until done is closed. It fails the test after 30 seconds.
func advanceUntil(t *testing.T, clock *fakeclock.Clock, d time.Duration, done <-chan struct{}, what string) {
	t.Helper()
	deadline := time.After(30 * time.Second) // a bound on a hang, not a sleep
	changed := clock.Changed()
	clock.Advance(d)
	for extra := 0; ; {
		select {
		case <-done:
			return
		case <-changed:
			changed = clock.Changed()
			if extra < 10 {
				extra++
				clock.Advance(time.Second)
			}
		case <-deadline:
			t.Fatalf("%s: not seen after advancing the clock", what)
		}
	}
}

// gatedHarness is a harness whose database holds the first RenewUsers
// call until release.
func gatedHarness(t *testing.T, o harnessOptions) (*harness, *gatedDB) {
	t.Helper()
	gdb := &gatedDB{entered: make(chan struct{}), gate: make(chan struct{})}
	o.wrapDB = func(db broker.Database) broker.Database {
		gdb.Database = db
		return gdb
	}
	h := newHarnessWith(t, o)
	t.Cleanup(gdb.release)
	return h, gdb
}

// testContext bounds a test: no call in these tests may hang.
func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func newTextLogger(w *syncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
