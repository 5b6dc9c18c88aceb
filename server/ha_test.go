package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/pgtest"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store/etcd"
)

// A broker group: two instances on one etcd prefix and one PostgreSQL
// target, each with its own engine, broker and gRPC server (over
// bufconn). One leads (runs expiry, reconciliation and disconnect
// revocations); the other stands by and serves calls. Every instance
// follows the store's change feed.

// haWait bounds each wait of these tests: a shared, slow machine.
const haWait = 90 * time.Second

// haRole is a role whose leases expire within a test.
const haRole = "ha_short"

type haGroup struct {
	target    *pgtest.Target
	endpoints []string
	prefix    string
}

type haInstance struct {
	name   string
	store  *etcd.Store
	engine *postgres.Engine
	broker *broker.Broker
	logs   *syncBuffer
	cred   pb.CredentialServiceClient
	admin  pb.AdminServiceClient
}

type haOptions struct {
	standby         bool
	disconnectGrace time.Duration
	quotas          Quotas
	sessionTTL      time.Duration
}

func newHAGroup(t *testing.T) *haGroup {
	t.Helper()
	c := etcdtest.StartCluster(t, 1)
	return &haGroup{
		target:    pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{}),
		endpoints: c.Endpoints(),
		prefix:    "/credbroker-ha-test/",
	}
}

// start starts one instance of the group.
func (g *haGroup) start(t *testing.T, name string, o haOptions) *haInstance {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), haWait)
	defer cancel()
	in := &haInstance{name: name, logs: &syncBuffer{}}
	logger := slog.New(slog.NewTextHandler(in.logs, &slog.HandlerOptions{Level: slog.LevelDebug})).With("instance", name)

	st, err := etcd.Open(ctx, etcd.Options{Endpoints: g.endpoints, Prefix: g.prefix, Logger: logger, SessionTTL: o.sessionTTL})
	if err != nil {
		t.Fatalf("etcd.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })
	in.store = st
	engCfg := g.target.EngineConfig()
	engCfg.Logger = logger
	eng, err := postgres.New(ctx, engCfg)
	if err != nil {
		t.Fatalf("postgres.New: %v", err)
	}
	t.Cleanup(eng.Close)
	in.engine = eng
	readOnly := g.target.ProxyRoles["read_only"]
	b, err := broker.New(broker.Config{
		Store:     st,
		Databases: map[string]broker.Database{"main": eng},
		Roles: []broker.Role{
			{Name: roleReadOnly, Target: "main", ProxyRole: readOnly, DefaultTTL: 10 * time.Minute, MaxTTL: time.Hour},
			{Name: haRole, Target: "main", ProxyRole: readOnly, DefaultTTL: 3 * time.Second, MaxTTL: 3 * time.Second},
		},
		Logger:          logger,
		Instance:        name,
		Standby:         o.standby,
		DisconnectGrace: o.disconnectGrace,
		IssuePool:       -1, // intents written by the pool would be another instance's to settle
	})
	if err != nil {
		t.Fatalf("broker.New: %v", err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatalf("broker.Start: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	in.broker = b

	gs := NewGRPCServer(Config{
		Broker:        b,
		Authenticator: headerAuthenticator{},
		Logger:        logger,
		Endpoints:     map[string]broker.Endpoint{"main": eng.Endpoint()},
		SSLMode:       "disable",
		Quotas:        o.quotas,
	})
	lis := bufconn.Listen(1 << 20)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	in.cred = pb.NewCredentialServiceClient(conn)
	in.admin = pb.NewAdminServiceClient(conn)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs of %s:\n%s", name, in.logs.String())
		}
	})
	return in
}

// issue issues a credential on in.
func (in *haInstance) issue(t *testing.T, ctx context.Context, role string, bound bool) *pb.IssueCredentialResponse {
	t.Helper()
	resp, err := in.cred.IssueCredential(as(ctx, "svc", false), &pb.IssueCredentialRequest{Role: role, RevokeOnDisconnect: bound})
	if err != nil {
		t.Fatalf("IssueCredential on %s: %v", in.name, err)
	}
	return resp
}

// lifecycle records the lifecycle events of an instance's broker.
type lifecycle struct {
	mu     sync.Mutex
	events []broker.AuditEvent
	signal chan struct{}
}

func watchLifecycle(t *testing.T, b *broker.Broker) *lifecycle {
	l := &lifecycle{signal: make(chan struct{}, 1)}
	stop := b.WatchLifecycle(func(ev broker.AuditEvent) {
		l.mu.Lock()
		l.events = append(l.events, ev)
		l.mu.Unlock()
		select {
		case l.signal <- struct{}{}:
		default:
		}
	})
	t.Cleanup(stop)
	return l
}

// waitFor waits until an event matches.
func (l *lifecycle) waitFor(t *testing.T, what string, match func(broker.AuditEvent) bool) broker.AuditEvent {
	t.Helper()
	deadline := time.NewTimer(haWait)
	defer deadline.Stop()
	for {
		l.mu.Lock()
		i := slices.IndexFunc(l.events, match)
		var ev broker.AuditEvent
		if i >= 0 {
			ev = l.events[i]
		}
		l.mu.Unlock()
		if i >= 0 {
			return ev
		}
		select {
		case <-l.signal:
		case <-deadline.C:
			t.Fatalf("%s: not within %v", what, haWait)
		}
	}
}

func (l *lifecycle) count(match func(broker.AuditEvent) bool) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, ev := range l.events {
		if match(ev) {
			n++
		}
	}
	return n
}

func localEnd(id string) func(broker.AuditEvent) bool {
	return func(ev broker.AuditEvent) bool {
		return ev.LeaseID == id && !ev.Remote && (ev.Action == broker.AuditRevoke || ev.Action == broker.AuditExpire)
	}
}

func remoteEvent(id, action string) func(broker.AuditEvent) bool {
	return func(ev broker.AuditEvent) bool { return ev.LeaseID == id && ev.Remote && ev.Action == action }
}

// A lease issued on the standby is expired by the leader, on time: the
// standby revokes nothing, so only the leader's queue, fed by the store's
// change feed, can have it.
func TestHALeaseIssuedOnStandbyIsExpiredByLeader(t *testing.T) {
	g := newHAGroup(t)
	a := g.start(t, "a", haOptions{})
	b := g.start(t, "b", haOptions{standby: true})
	aEvents := watchLifecycle(t, a.broker)
	ctx := testContext(t)

	resp := b.issue(t, ctx, haRole, false)
	id := resp.GetLease().GetId()
	aEvents.waitFor(t, "the leader expiring the lease issued on the standby", localEnd(id))

	got, err := a.broker.Lookup(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != broker.StateExpired {
		t.Fatalf("lease %s, want expired", got.State)
	}
	lag := got.EndTime.Sub(got.ExpireTime)
	// The leader's queue had the lease from the feed: the lag is the
	// dispatcher's and the revocation's, not a scan's.
	if lag < 0 || lag > 5*time.Second {
		t.Errorf("expired %v after its expire time, want within [0, 5s]", lag)
	}
	users, err := a.engine.ListManagedUsers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(users, resp.GetCredential().GetUsername()) {
		t.Errorf("user %s still exists after its lease expired", resp.GetCredential().GetUsername())
	}
	if strings.Contains(b.logs.String(), "lease ended") {
		t.Errorf("the standby ended a lease; only the leader may:\n%s", b.logs.String())
	}
	t.Logf("expiry lag of a lease issued on the standby: %v", lag)
}

// openStream opens a KeepAlive stream on in naming id and reads the answer.
func openStream(t *testing.T, ctx context.Context, in *haInstance, id string) pb.CredentialService_KeepAliveClient {
	t.Helper()
	stream, err := in.cred.KeepAlive(as(ctx, "svc", false))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.KeepAliveRequest{LeaseId: id}); err != nil {
		t.Fatal(err)
	}
	r, err := stream.Recv()
	if err != nil || r.GetLease().GetId() != id {
		t.Fatalf("first answer on %s: %v, %v", in.name, r, err)
	}
	return stream
}

// drainStream reads the stream until the server ends it and returns the events
// it sent.
func drainStream(t *testing.T, stream pb.CredentialService_KeepAliveClient) []pb.KeepAliveEvent {
	t.Helper()
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var out []pb.KeepAliveEvent
	for {
		r, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("stream ended with %v", err)
		}
		out = append(out, r.GetEvent())
	}
}

// waitEvent reads the stream until an answer of kind event for id.
func waitEvent(t *testing.T, stream pb.CredentialService_KeepAliveClient, id string, event pb.KeepAliveEvent) {
	t.Helper()
	for {
		r, err := stream.Recv()
		if err != nil {
			t.Fatalf("waiting for %s: %v", event, err)
		}
		if r.GetLease().GetId() != id {
			continue
		}
		switch r.GetEvent() {
		case event:
			return
		case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_EXPIRED, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND:
			t.Fatalf("waiting for %s: got %s", event, r.GetEvent())
		}
	}
}

// A revocation on one instance reaches a KeepAlive stream on the other as
// REVOKED, once; a revocation on the stream's own instance, which the feed
// reports too, also reaches it once.
func TestHARevokeReachesStreamsOnEveryInstance(t *testing.T) {
	g := newHAGroup(t)
	a := g.start(t, "a", haOptions{})
	b := g.start(t, "b", haOptions{standby: true})
	ctx := testContext(t)

	for _, tc := range []struct {
		name    string
		revoker *haInstance
	}{
		{"revoked on the other instance", a},
		{"revoked on the stream's instance", b},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := a.issue(t, ctx, roleReadOnly, false).GetLease().GetId()
			stream := openStream(t, ctx, b, id)
			if _, err := tc.revoker.cred.RevokeLease(as(ctx, "svc", false), &pb.RevokeLeaseRequest{LeaseId: id}); err != nil {
				t.Fatal(err)
			}
			waitEvent(t, stream, id, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED)
			// The feed reports the revocation again (and, on the
			// revoker, it was published locally): none of it is sent
			// twice. Wait until b's feed has reported it, then end the
			// stream and read what is left.
			bEvents := watchLifecycle(t, b.broker)
			waitFed(t, ctx, a, b, bEvents)
			if rest := drainStream(t, stream); slices.Contains(rest, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED) {
				t.Errorf("REVOKED sent again: %v", rest)
			}
		})
	}
}

// waitFed waits until b's feed has applied everything written before it
// was called: a lease issued on a now reaches b as a remote issue.
func waitFed(t *testing.T, ctx context.Context, a, b *haInstance, bEvents *lifecycle) {
	t.Helper()
	id := a.issue(t, ctx, roleReadOnly, false).GetLease().GetId()
	bEvents.waitFor(t, "b's feed catching up", remoteEvent(id, broker.AuditIssue))
}

// A revoke_on_disconnect lease whose stream is on the standby lives while
// that stream is open, however long, and is revoked by the leader once
// the stream closes; and when the standby dies with the stream open (its
// session, and so its stream marks, time out), the leader revokes it too.
func TestHADisconnectOnStandbyIsRevokedByLeader(t *testing.T) {
	const grace = time.Second
	g := newHAGroup(t)
	a := g.start(t, "a", haOptions{disconnectGrace: grace})
	b := g.start(t, "b", haOptions{standby: true, disconnectGrace: grace, sessionTTL: 2 * time.Second})
	aEvents := watchLifecycle(t, a.broker)
	bEvents := watchLifecycle(t, b.broker)
	ctx := testContext(t)

	closed := b.issue(t, ctx, roleReadOnly, true).GetLease().GetId()
	crashed := b.issue(t, ctx, roleReadOnly, true).GetLease().GetId()
	closedStream := openStream(t, ctx, b, closed)
	openStream(t, ctx, b, crashed)

	// Both streams stay open on b for several grace periods (a's
	// maintenance loop ticks every second): a must not revoke either.
	// This waits on time on purpose: what it checks is that nothing
	// happens during it. Renewals on the stream make the time pass.
	waitFed(t, ctx, b, a, aEvents)
	start := time.Now()
	for time.Since(start) < 4*grace {
		if err := closedStream.Send(&pb.KeepAliveRequest{LeaseId: closed}); err != nil {
			t.Fatal(err)
		}
		waitEvent(t, closedStream, closed, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED)
	}
	if n := aEvents.count(localEnd(closed)) + aEvents.count(localEnd(crashed)); n != 0 {
		t.Fatalf("the leader revoked %d lease(s) whose stream is open on the standby", n)
	}

	closeStream(t, closedStream)
	ev := aEvents.waitFor(t, "the leader revoking the lease whose stream closed on the standby", localEnd(closed))
	if ev.Reason != broker.ReasonDisconnect {
		t.Errorf("revoked for %q, want %q", ev.Reason, broker.ReasonDisconnect)
	}
	bEvents.waitFor(t, "the standby hearing of it", remoteEvent(closed, broker.AuditRevoke))

	// b dies, as far as etcd can tell: its connection goes, no stream
	// closes, no mark is removed, its session is not revoked but times out.
	_ = b.store.Client().Close()
	ev = aEvents.waitFor(t, "the leader revoking the lease whose instance died", localEnd(crashed))
	if ev.Reason != broker.ReasonDisconnect {
		t.Errorf("revoked for %q, want %q", ev.Reason, broker.ReasonDisconnect)
	}
	l, err := a.broker.Lookup(ctx, crashed)
	if err != nil || l.State != broker.StateRevoked {
		t.Fatalf("lease after its instance died: %v, %v; want revoked", l.State, err)
	}
}

// Quotas count the group's leases: what one instance issued counts on the
// other once the feed has brought it, and so does its end.
func TestHAQuotaCountsTheGroup(t *testing.T) {
	q := Quotas{RoleMaxActive: map[string]int{roleReadOnly: 2}}
	g := newHAGroup(t)
	a := g.start(t, "a", haOptions{quotas: q})
	b := g.start(t, "b", haOptions{standby: true, quotas: q})
	aEvents := watchLifecycle(t, a.broker)
	bEvents := watchLifecycle(t, b.broker)
	ctx := testContext(t)

	refused := func(in *haInstance) {
		t.Helper()
		_, err := in.cred.IssueCredential(as(ctx, "svc", false), &pb.IssueCredentialRequest{Role: roleReadOnly})
		if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("third issue on %s: %v, want ResourceExhausted", in.name, err)
		}
	}
	first := a.issue(t, ctx, roleReadOnly, false).GetLease().GetId()
	bEvents.waitFor(t, "b hearing of a's issue", remoteEvent(first, broker.AuditIssue))
	second := b.issue(t, ctx, roleReadOnly, false).GetLease().GetId()
	aEvents.waitFor(t, "a hearing of b's issue", remoteEvent(second, broker.AuditIssue))
	refused(a)
	refused(b)

	if _, err := b.cred.RevokeLease(as(ctx, "svc", false), &pb.RevokeLeaseRequest{LeaseId: first}); err != nil {
		t.Fatal(err)
	}
	aEvents.waitFor(t, "a hearing of the revocation on b", remoteEvent(first, broker.AuditRevoke))
	third := a.issue(t, ctx, roleReadOnly, false).GetLease().GetId()
	bEvents.waitFor(t, "b hearing of a's issue", remoteEvent(third, broker.AuditIssue))
	refused(b)
}
