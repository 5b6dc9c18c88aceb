package server

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/fakeclock"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// closeStream half-closes a KeepAlive stream and waits for the server to
// end it. The server reports the stream's leases to broker.StreamClosed
// before its handler returns, so when this returns they are released.
func closeStream(t *testing.T, stream pb.CredentialService_KeepAliveClient) {
	t.Helper()
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := stream.Recv(); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("stream ended with %v, want EOF", err)
			}
			return
		}
	}
}

// A revoke_on_disconnect lease lives while a stream names it; once the
// stream is gone the broker revokes it after its grace period. That only
// works if the server pairs StreamOpened with StreamClosed.
func TestKeepAliveStreamEndReleasesLease(t *testing.T) {
	clock := fakeclock.New(time.Now())
	h := newHarnessWith(t, harnessOptions{clock: clock})
	ctx := testContext(t)
	resp, err := h.cred.IssueCredential(as(ctx, "svc-a", false), &pb.IssueCredentialRequest{Role: roleReadOnly, RevokeOnDisconnect: true})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetLease().GetId()
	if !resp.GetLease().GetRevokeOnDisconnect() {
		t.Error("revoke_on_disconnect not reported on the lease")
	}

	stream, err := h.cred.KeepAlive(as(ctx, "svc-a", false))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.KeepAliveRequest{LeaseId: id}); err != nil {
		t.Fatal(err)
	}
	if r, err := stream.Recv(); err != nil || r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
		t.Fatalf("renew: %v, %v", r, err)
	}
	closeStream(t, stream)

	revoked := make(chan struct{})
	var once sync.Once
	stop := h.broker.WatchLifecycle(func(ev broker.AuditEvent) {
		if ev.LeaseID == id && ev.Action == broker.AuditRevoke {
			once.Do(func() { close(revoked) })
		}
	})
	defer stop()
	// Past the default 30s DisconnectGrace, far below the lease's 10-minute
	// TTL: a revocation seen here is the disconnect's, not the expiry's.
	advanceUntil(t, clock, 31*time.Second, revoked, "revocation after the stream closed")
}

// The lease limit of a stream answers ResourceExhausted for one more lease
// without closing the stream, and a lease that is gone frees its place.
func TestKeepAliveLeaseLimit(t *testing.T) {
	h := newHarnessWith(t, harnessOptions{maxStreamLeases: 1})
	ctx := testContext(t)
	first := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease().GetId()
	second := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease().GetId()

	sctx, cancel := context.WithTimeout(as(ctx, "svc-a", false), 30*time.Second)
	defer cancel()
	stream, err := h.cred.KeepAlive(sctx)
	if err != nil {
		t.Fatal(err)
	}
	recv := func(id string) *pb.KeepAliveResponse {
		t.Helper()
		for {
			r, err := stream.Recv()
			if err != nil {
				t.Fatalf("Recv: %v", err)
			}
			if r.GetLease().GetId() == id {
				return r
			}
		}
	}
	send := func(id string) {
		t.Helper()
		if err := stream.Send(&pb.KeepAliveRequest{LeaseId: id}); err != nil {
			t.Fatal(err)
		}
	}

	send(first)
	if r := recv(first); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
		t.Fatalf("first lease: %v %q", r.GetEvent(), r.GetMessage())
	}
	send(second)
	if r := recv(second); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_UNSPECIFIED ||
		!strings.HasPrefix(r.GetMessage(), "ResourceExhausted: ") {
		t.Fatalf("second lease over the limit: %v %q", r.GetEvent(), r.GetMessage())
	}

	// The owner revokes the first lease; the stream is told and lets it go.
	if _, err := h.cred.RevokeLease(as(ctx, "svc-a", false), &pb.RevokeLeaseRequest{LeaseId: first}); err != nil {
		t.Fatal(err)
	}
	if r := recv(first); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED {
		t.Fatalf("first lease after revoke: %v", r.GetEvent())
	}
	// The release happens right after the event is queued; a renewal
	// answered with ResourceExhausted would mean it had not happened yet,
	// so ask until the answer changes (bounded by the stream's deadline).
	for {
		send(second)
		r := recv(second)
		if r.GetEvent() == pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
			break
		}
		if !strings.HasPrefix(r.GetMessage(), "ResourceExhausted: ") {
			t.Fatalf("second lease after the first was released: %v %q", r.GetEvent(), r.GetMessage())
		}
	}
	closeStream(t, stream)
}

// gatedDB holds the first RenewUsers call until release.
type gatedDB struct {
	broker.Database
	once        sync.Once
	entered     chan struct{}
	gate        chan struct{}
	releaseOnce sync.Once
}

func (d *gatedDB) RenewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	first := false
	d.once.Do(func() { first = true })
	if first {
		close(d.entered)
		<-d.gate
	}
	return d.Database.RenewUsers(ctx, reqs)
}

// release lets the held call go on; it may be called more than once.
func (d *gatedDB) release() { d.releaseOnce.Do(func() { close(d.gate) }) }

// waitEntered waits until the first RenewUsers call is held.
func (d *gatedDB) waitEntered(t *testing.T) {
	t.Helper()
	select {
	case <-d.entered:
	case <-time.After(10 * time.Second): // a bound on a hang, not a sleep
		t.Fatal("the first renewal never reached PostgreSQL")
	}
}

// Requests on one stream are handled at once, not one after the other:
// while the renewal of one lease is held in PostgreSQL, another lease on
// the same stream is renewed (the broker may run two batches at once here).
func TestKeepAliveHandlesAStreamsRequestsAtOnce(t *testing.T) {
	h, gdb := gatedHarness(t, harnessOptions{renewBatches: 2})
	ctx := testContext(t)
	held := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease().GetId()
	other := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease().GetId()

	sctx, cancel := context.WithTimeout(as(ctx, "svc-a", false), 30*time.Second)
	defer cancel()
	stream, err := h.cred.KeepAlive(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.KeepAliveRequest{LeaseId: held}); err != nil {
		t.Fatal(err)
	}
	gdb.waitEntered(t)
	if err := stream.Send(&pb.KeepAliveRequest{LeaseId: other}); err != nil {
		t.Fatal(err)
	}
	answered := make(chan *pb.KeepAliveResponse, 2)
	recvErr := make(chan error, 1)
	go func() { // the only reader of the stream
		defer close(answered)
		for {
			r, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			answered <- r
		}
	}()
	select {
	case r := <-answered:
		if r.GetLease().GetId() != other || r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
			t.Fatalf("first answer: %s %v %q, want %s renewed", r.GetLease().GetId(), r.GetEvent(), r.GetMessage(), other)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the second lease was not renewed while the first one's renewal was held")
	}
	gdb.release()
	r, ok := <-answered
	if !ok || r.GetLease().GetId() != held || r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
		t.Fatalf("second answer: %v (ok %v), want %s renewed", r, ok, held)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for range answered {
	}
	if err := <-recvErr; !errors.Is(err, io.EOF) {
		t.Fatalf("stream ended with %v, want EOF", err)
	}
}

// All streams together name at most MaxKeepAliveLeases leases: one more
// answers ResourceExhausted on its stream, which stays open, and a stream
// that ends gives its places back.
func TestKeepAliveLeaseLimitAcrossStreams(t *testing.T) {
	h := newHarnessWith(t, harnessOptions{maxKeepAliveLeases: 1})
	ctx := testContext(t)
	first := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease().GetId()
	second := h.issue(t, ctx, "svc-b", roleReadOnly).GetLease().GetId()

	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	open := func(client string) pb.CredentialService_KeepAliveClient {
		t.Helper()
		s, err := h.cred.KeepAlive(as(sctx, client, false))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ask := func(s pb.CredentialService_KeepAliveClient, id string) *pb.KeepAliveResponse {
		t.Helper()
		if err := s.Send(&pb.KeepAliveRequest{LeaseId: id}); err != nil {
			t.Fatal(err)
		}
		r, err := s.Recv()
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		if r.GetLease().GetId() != id {
			t.Fatalf("answer for %q, want %q", r.GetLease().GetId(), id)
		}
		return r
	}
	a, b := open("svc-a"), open("svc-b")
	if r := ask(a, first); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
		t.Fatalf("first lease: %v %q", r.GetEvent(), r.GetMessage())
	}
	r := ask(b, second)
	if r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_UNSPECIFIED ||
		!strings.HasPrefix(r.GetMessage(), "ResourceExhausted: ") || !strings.Contains(r.GetMessage(), "on all streams") {
		t.Fatalf("a lease over the limit of all streams: %v %q", r.GetEvent(), r.GetMessage())
	}
	closeStream(t, a)
	if r := ask(b, second); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
		t.Fatalf("after the other stream ended: %v %q", r.GetEvent(), r.GetMessage())
	}
	closeStream(t, b)
}
