package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/storetest"
)

// The change feed (broker.LeaseFeed) and the stream marks
// (broker.StreamMarker): what one instance of a group learns of the
// others' writes.

// feedWait bounds every wait for the feed; the machine is shared and slow.
const feedWait = 60 * time.Second

// feedRecorder keeps what a follower delivered.
type feedRecorder struct {
	mu     sync.Mutex
	events []broker.FeedEvent
	signal chan struct{}
	done   chan error
	cancel context.CancelFunc
}

// follow runs FollowLeases on s until the test ends.
func follow(t *testing.T, s *etcd.Store) *feedRecorder {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &feedRecorder{signal: make(chan struct{}, 1), done: make(chan error, 1), cancel: cancel}
	go func() {
		r.done <- s.FollowLeases(ctx, func(ev broker.FeedEvent) {
			r.mu.Lock()
			r.events = append(r.events, ev)
			r.mu.Unlock()
			select {
			case r.signal <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-r.done:
			if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, broker.ErrClosed) {
				t.Errorf("FollowLeases returned %v", err)
			}
		case <-time.After(feedWait):
			t.Errorf("FollowLeases did not return after its context ended")
		}
	})
	return r
}

// snapshot returns a copy of what was delivered so far.
func (r *feedRecorder) snapshot() []broker.FeedEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// waitFor waits until cond holds for the events delivered so far.
func (r *feedRecorder) waitFor(t *testing.T, what string, cond func([]broker.FeedEvent) bool) []broker.FeedEvent {
	t.Helper()
	deadline := time.NewTimer(feedWait)
	defer deadline.Stop()
	for {
		evs := r.snapshot()
		if cond(evs) {
			return evs
		}
		select {
		case <-r.signal:
		case err := <-r.done:
			t.Fatalf("waiting for %s: FollowLeases returned %v; events: %s", what, err, describe(evs))
		case <-deadline.C:
			t.Fatalf("waiting for %s: not within %v; events: %s", what, feedWait, describe(evs))
		}
	}
}

func describe(evs []broker.FeedEvent) string {
	var out []string
	for _, ev := range evs {
		switch ev.Kind {
		case broker.FeedReset:
			out = append(out, fmt.Sprintf("reset@%d(%d leases, %d marks)", ev.Revision, len(ev.Leases), len(ev.Streams)))
		case broker.FeedLease:
			out = append(out, fmt.Sprintf("lease@%d(%s %s created=%v)", ev.Revision, ev.Lease.ID, ev.Lease.State, ev.Created))
		case broker.FeedLeaseDeleted:
			out = append(out, fmt.Sprintf("deleted@%d(%s)", ev.Revision, ev.LeaseID))
		case broker.FeedStreamOpen:
			out = append(out, fmt.Sprintf("open@%d(%s/%s)", ev.Revision, ev.Stream.Instance, ev.Stream.LeaseID))
		case broker.FeedStreamClosed:
			out = append(out, fmt.Sprintf("closed@%d(%s/%s)", ev.Revision, ev.Stream.Instance, ev.Stream.LeaseID))
		}
	}
	return fmt.Sprint(out)
}

func resets(evs []broker.FeedEvent) []broker.FeedEvent {
	return slices.DeleteFunc(slices.Clone(evs), func(ev broker.FeedEvent) bool { return ev.Kind != broker.FeedReset })
}

// has reports whether evs hold an event of kind about id.
func has(evs []broker.FeedEvent, kind broker.FeedKind, id string, state broker.LeaseState) bool {
	return slices.ContainsFunc(evs, func(ev broker.FeedEvent) bool {
		switch kind {
		case broker.FeedLease:
			return ev.Kind == kind && ev.Lease.ID == id && ev.Lease.State == state
		case broker.FeedLeaseDeleted:
			return ev.Kind == kind && ev.LeaseID == id
		case broker.FeedStreamOpen, broker.FeedStreamClosed:
			return ev.Kind == kind && ev.Stream.LeaseID == id
		}
		return false
	})
}

// The feed starts with the live leases at one revision, then delivers
// every write another client makes, in revision order: creation (flagged),
// update, the end of a lease, and deletion.
func TestFeedResetThenChanges(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	s := openAt(t, eps, prefix)
	other := openAt(t, eps, prefix)
	leases := createN(t, other, 3, nil)
	ended := leases[2]
	ended.State, ended.EndTime = broker.StateRevoked, at(time.Minute)
	storetest.MustUpdate(t, other, ended)

	r := follow(t, s)
	evs := r.waitFor(t, "the first reset", func(evs []broker.FeedEvent) bool { return len(evs) > 0 })
	first := evs[0]
	if first.Kind != broker.FeedReset {
		t.Fatalf("first event %s, want a reset", describe(evs[:1]))
	}
	if ids := storetest.IDs(first.Leases); !slices.Equal(ids, []string{"l000", "l001"}) {
		t.Errorf("reset holds %q, want the two live leases l000 and l001", ids)
	}

	fresh := storetest.NewLease("fresh", "ro", "svc", at(time.Hour))
	storetest.MustCreate(t, other, fresh)
	renewed := leases[0]
	renewed.ExpireTime = at(2 * time.Hour)
	renewed = storetest.MustUpdate(t, other, renewed)
	expired := leases[1]
	expired.State, expired.EndTime = broker.StateExpired, at(time.Hour)
	storetest.MustUpdate(t, other, expired)
	if err := other.DeleteLease(t.Context(), "l002"); err != nil {
		t.Fatal(err)
	}

	evs = r.waitFor(t, "the deletion of l002", func(evs []broker.FeedEvent) bool { return has(evs, broker.FeedLeaseDeleted, "l002", 0) })
	changes := evs[1:]
	if len(changes) != 4 {
		t.Fatalf("changes %s, want exactly four", describe(changes))
	}
	if ev := changes[0]; ev.Kind != broker.FeedLease || ev.Lease.ID != "fresh" || !ev.Created || ev.Lease.Revision != ev.Revision {
		t.Errorf("first change %s, want the creation of fresh", describe(changes[:1]))
	}
	if ev := changes[1]; ev.Lease.ID != "l000" || ev.Created || !ev.Lease.ExpireTime.Equal(renewed.ExpireTime) || ev.Lease.Revision != renewed.Revision {
		t.Errorf("second change %s (expire %v), want l000 renewed to %v at revision %d", describe(changes[1:2]), ev.Lease.ExpireTime, renewed.ExpireTime, renewed.Revision)
	}
	if ev := changes[2]; ev.Lease.ID != "l001" || ev.Lease.State != broker.StateExpired {
		t.Errorf("third change %s, want l001 expired", describe(changes[2:3]))
	}
	for i := 1; i < len(evs); i++ {
		if evs[i].Revision <= evs[i-1].Revision {
			t.Errorf("revisions do not grow: %s", describe(evs))
		}
	}
}

// A watch whose next revision was compacted cannot resume without a gap:
// the feed scans again and delivers a second reset that holds what
// happened in the gap, and goes on from there.
func TestFeedRescansAfterCompaction(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	s := openAt(t, eps, prefix)
	other := openAt(t, eps, prefix)
	createN(t, other, 2, nil)

	var starts atomic.Int32
	restore := etcd.SetWatchStartHook(func(int64) {
		if starts.Add(1) != 1 {
			return
		}
		// Between the first scan and its watch: a lease is created and
		// another ends, and the history of both is compacted away.
		ctx := context.Background()
		gap := storetest.NewLease("ingap", "ro", "svc", at(time.Hour))
		if err := other.CreateLease(ctx, &gap); err != nil {
			t.Errorf("CreateLease: %v", err)
		}
		l, err := other.GetLease(ctx, "l000")
		if err != nil {
			t.Errorf("GetLease: %v", err)
			return
		}
		l.State, l.EndTime = broker.StateRevoked, at(time.Minute)
		if _, err := other.UpdateLease(ctx, l); err != nil {
			t.Errorf("UpdateLease: %v", err)
		}
		compactNow(t, other.Client())
	})
	defer restore()

	r := follow(t, s)
	evs := r.waitFor(t, "a second reset", func(evs []broker.FeedEvent) bool { return len(resets(evs)) >= 2 })
	second := resets(evs)[1]
	if ids := storetest.IDs(second.Leases); !slices.Equal(ids, []string{"ingap", "l001"}) {
		t.Errorf("second reset holds %q, want ingap and l001 (l000 ended in the gap)", ids)
	}
	if second.Revision <= evs[0].Revision {
		t.Errorf("second reset at revision %d, not after the first (%d)", second.Revision, evs[0].Revision)
	}
	after := storetest.NewLease("after", "ro", "svc", at(time.Hour))
	storetest.MustCreate(t, other, after)
	r.waitFor(t, "the creation after the rescan", func(evs []broker.FeedEvent) bool { return has(evs, broker.FeedLease, "after", broker.StateActive) })
}

func compactNow(t *testing.T, cli *clientv3.Client) {
	t.Helper()
	ctx := context.Background()
	resp, err := cli.Get(ctx, "any")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Errorf("Compact: %v", err)
	}
}

// A feed survives its etcd going away and coming back: the watch resumes
// from the revision after the last one delivered, without a reset, and
// what was written after the restart arrives.
func TestFeedResumesAfterEtcdRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an etcd process of its own")
	}
	c := etcdtest.StartCluster(t, 1)
	eps := c.Endpoints()
	s := openAt(t, eps, "/feed/")
	other := openAt(t, eps, "/feed/")
	createN(t, other, 1, nil)
	r := follow(t, s)
	r.waitFor(t, "the first reset", func(evs []broker.FeedEvent) bool { return len(evs) > 0 })
	before := storetest.NewLease("before", "ro", "svc", at(time.Hour))
	storetest.MustCreate(t, other, before)
	r.waitFor(t, "before", func(evs []broker.FeedEvent) bool { return has(evs, broker.FeedLease, "before", broker.StateActive) })

	c.Members[0].Kill()
	c.Members[0].Restart(t)
	after := storetest.NewLease("after", "ro", "svc", at(time.Hour))
	ctx, cancel := context.WithTimeout(t.Context(), feedWait)
	defer cancel()
	for {
		// The first write after the restart may meet the client still
		// reconnecting; a write that failed outright is retried.
		err := other.CreateLease(ctx, &after)
		if err == nil || errors.Is(err, broker.ErrExists) {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("CreateLease after the restart: %v", err)
		}
	}
	evs := r.waitFor(t, "after", func(evs []broker.FeedEvent) bool { return has(evs, broker.FeedLease, "after", broker.StateActive) })
	if n := len(resets(evs)); n != 1 {
		t.Errorf("%d resets, want 1 (the history was not compacted, so the watch resumes): %s", n, describe(evs))
	}
}

// A stream mark reaches the other instances' feeds, goes when it is
// removed, and goes when its process dies without removing it (its
// session is not renewed); the marks in place at a reset are in it.
func TestStreamMarks(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	a, err := etcd.Open(t.Context(), etcd.Options{Endpoints: eps, Prefix: prefix, SessionTTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	watcher := openAt(t, eps, prefix)

	if err := a.MarkStream(t.Context(), "a", "kept"); err != nil {
		t.Fatal(err)
	}
	r := follow(t, watcher)
	evs := r.waitFor(t, "the first reset", func(evs []broker.FeedEvent) bool { return len(evs) > 0 })
	if m := evs[0].Streams; len(m) != 1 || m[0] != (broker.StreamMark{Instance: "a", LeaseID: "kept"}) {
		t.Errorf("reset marks %+v, want a/kept", m)
	}
	for _, id := range []string{"closed", "crashed"} {
		if err := a.MarkStream(t.Context(), "a", id); err != nil {
			t.Fatal(err)
		}
	}
	r.waitFor(t, "two marks", func(evs []broker.FeedEvent) bool {
		return has(evs, broker.FeedStreamOpen, "closed", 0) && has(evs, broker.FeedStreamOpen, "crashed", 0)
	})
	if err := a.UnmarkStream(t.Context(), "a", "closed"); err != nil {
		t.Fatal(err)
	}
	r.waitFor(t, "closed unmarked", func(evs []broker.FeedEvent) bool { return has(evs, broker.FeedStreamClosed, "closed", 0) })

	if err := etcd.CheckInstance("a/b"); err == nil {
		t.Errorf("CheckInstance accepts a/b")
	}
	if err := a.MarkStream(t.Context(), "a/b", "x"); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Errorf("MarkStream with instance a/b: %v, want ErrInvalidArgument", err)
	}

	etcd.Crash(a) // no unmark, no revoke: the session times out
	r.waitFor(t, "the crashed instance's marks gone", func(evs []broker.FeedEvent) bool {
		return has(evs, broker.FeedStreamClosed, "crashed", 0) && has(evs, broker.FeedStreamClosed, "kept", 0)
	})
}

// A session that ends while its process lives (revoked here; in life,
// cut off from etcd for longer than its TTL) takes the marks with it; the
// process puts them again under a new session.
func TestStreamMarksComeBackAfterTheSessionEnds(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	a := openAt(t, eps, prefix)
	watcher := openAt(t, eps, prefix)
	if err := a.MarkStream(t.Context(), "a", "m"); err != nil {
		t.Fatal(err)
	}
	r := follow(t, watcher)
	r.waitFor(t, "the first reset", func(evs []broker.FeedEvent) bool { return len(evs) > 0 })
	first := etcd.SessionLease(a)
	if _, err := watcher.Client().Revoke(t.Context(), clientv3.LeaseID(first)); err != nil {
		t.Fatal(err)
	}
	evs := r.waitFor(t, "the mark back", func(evs []broker.FeedEvent) bool {
		closed := slices.IndexFunc(evs, func(ev broker.FeedEvent) bool { return ev.Kind == broker.FeedStreamClosed })
		return closed >= 0 && has(evs[closed:], broker.FeedStreamOpen, "m", 0)
	})
	if got := etcd.SessionLease(a); got == first || got == 0 {
		t.Errorf("session %x after the first ended (%x), want a new one; events %s", got, first, describe(evs))
	}
}

// BenchmarkFeedDelivery measures a lease write on one client until its
// change reaches a follower on another: the delay before another instance
// of the group knows of an issue (and so the window of the quota bound).
func BenchmarkFeedDelivery(b *testing.B) {
	eps := etcdtest.Server(b)
	prefix := etcdtest.Prefix(b, eps)
	open := func() *etcd.Store {
		s, err := etcd.Open(b.Context(), etcd.Options{Endpoints: eps, Prefix: prefix})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = s.Close() })
		return s
	}
	s, writer := open(), open()
	got := make(chan string, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan struct{})
	go func() {
		_ = s.FollowLeases(ctx, func(ev broker.FeedEvent) {
			switch ev.Kind {
			case broker.FeedReset:
				close(ready)
			case broker.FeedLease:
				got <- ev.Lease.ID
			}
		})
	}()
	<-ready
	for i := 0; b.Loop(); i++ {
		l := storetest.NewLease(fmt.Sprintf("b%08d", i), "ro", "svc", at(time.Hour))
		if err := writer.CreateLease(ctx, &l); err != nil {
			b.Fatal(err)
		}
		select {
		case id := <-got:
			if id != l.ID {
				b.Fatalf("got %s, want %s", id, l.ID)
			}
		case <-time.After(feedWait):
			b.Fatal("no event")
		}
	}
}

// A follower connected to a member that loses its quorum does not wait on
// it silently: the watch requires a leader, so it ends, the feed says so
// and resumes, and once the quorum is back it delivers what was written,
// without a reset (nothing was compacted).
func TestFeedResumesAfterQuorumLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a three-member cluster")
	}
	c := etcdtest.StartCluster(t, 3)
	logs := &syncbuf.Buffer{}
	s, err := etcd.Open(t.Context(), etcd.Options{
		Endpoints: []string{c.Members[0].ClientURL}, Prefix: "/feed/", DialTimeout: 10 * time.Second,
		Logger: slog.New(slog.NewTextHandler(logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	writer := openAt(t, c.Endpoints(), "/feed/")
	r := follow(t, s)
	r.waitFor(t, "the first reset", func(evs []broker.FeedEvent) bool { return len(evs) > 0 })

	c.Members[1].Kill()
	c.Members[2].Kill()
	deadline := time.Now().Add(feedWait)
	for !strings.Contains(logs.String(), "change feed watch ended") {
		// The member notices it has no leader after its election
		// timeout; the feed logs when its watch is cancelled for it.
		if time.Now().After(deadline) {
			t.Fatalf("the watch did not end without a leader; store log:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond) // polling a log: a condition with a deadline
	}
	c.Members[1].Restart(t)
	c.Members[2].Restart(t)
	l := storetest.NewLease("back", "ro", "svc", at(time.Hour))
	ctx, cancel := context.WithTimeout(t.Context(), feedWait)
	defer cancel()
	for {
		err := writer.CreateLease(ctx, &l)
		if err == nil || errors.Is(err, broker.ErrExists) {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("CreateLease after the quorum came back: %v", err)
		}
	}
	evs := r.waitFor(t, "the lease written after the quorum came back", func(evs []broker.FeedEvent) bool {
		return has(evs, broker.FeedLease, "back", broker.StateActive)
	})
	if n := len(resets(evs)); n != 1 {
		t.Errorf("%d resets, want 1: %s", n, describe(evs))
	}
}

// What another instance writes reaches this one's index cache through the
// feed: updating such a lease at the revision the feed delivered, or
// taking its hint, sends no read.
func TestFeedFillsTheIndexCache(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	s := openAt(t, eps, prefix)
	other := openAt(t, eps, prefix)
	r := follow(t, s)
	// The create comes after the feed's scan, so the watch delivers it.
	r.waitFor(t, "the first reset", func(evs []broker.FeedEvent) bool { return len(evs) > 0 })
	l := storetest.MustCreate(t, other, storetest.NewLease("elsewhere", "ro", "svc", at(time.Hour)))[0]
	r.waitFor(t, "the other instance's create", func(evs []broker.FeedEvent) bool {
		return slices.ContainsFunc(evs, func(ev broker.FeedEvent) bool {
			return ev.Kind == broker.FeedLease && ev.Lease.ID == l.ID && ev.Lease.Revision == l.Revision
		})
	})
	before := etcd.Reads(s)
	if h, err := s.LeaseHint(t.Context(), l.ID); err != nil || h.Revision != l.Revision {
		t.Fatalf("hint: %+v, %v; want revision %d", h, err, l.Revision)
	}
	l.ExpireTime = at(30 * time.Minute) // earlier: the index key moves
	if _, err := s.UpdateLease(t.Context(), l); err != nil {
		t.Fatal(err)
	}
	if n := etcd.Reads(s) - before; n != 0 {
		t.Errorf("hint and update of a lease the feed delivered sent %d reads, want 0", n)
	}
	if e := expiryIDs(t, s); len(e) != 1 || !e[l.ID].Equal(at(30*time.Minute)) {
		t.Errorf("expiry index %v, want only %s at %v", e, l.ID, at(30*time.Minute))
	}
}
