package broker_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
)

// fakeLeadership hands out the terms a test grants, and tells the test
// when the broker campaigns (so it knows the previous term's work has
// stopped: the broker campaigns again only after that).
type fakeLeadership struct {
	grant       chan *fakeTerm
	campaigning chan struct{}
}

func newFakeLeadership() *fakeLeadership {
	return &fakeLeadership{grant: make(chan *fakeTerm), campaigning: make(chan struct{}, 16)}
}

func (f *fakeLeadership) Campaign(ctx context.Context) (broker.Term, error) {
	f.campaigning <- struct{}{}
	select {
	case t := <-f.grant:
		return t, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// waitCampaigning waits, with a deadline, for the broker to campaign.
func (f *fakeLeadership) waitCampaigning(t *testing.T) {
	t.Helper()
	select {
	case <-f.campaigning:
	case <-time.After(10 * time.Second):
		t.Fatal("the broker did not campaign within 10s")
	}
}

type fakeTerm struct {
	fence    broker.Fence
	done     chan struct{}
	once     sync.Once
	deposed  atomic.Bool // Confirm answers ErrNotLeader
	confirms atomic.Int32
	resigned atomic.Bool
}

func newFakeTerm(rev int64) *fakeTerm {
	return &fakeTerm{fence: broker.Fence{Key: "leader/x", Revision: rev}, done: make(chan struct{})}
}

func (t *fakeTerm) Done() <-chan struct{} { return t.done }
func (t *fakeTerm) Fence() broker.Fence   { return t.fence }
func (t *fakeTerm) end()                  { t.once.Do(func() { close(t.done) }) }
func (t *fakeTerm) Confirm(context.Context) error {
	t.confirms.Add(1)
	if t.deposed.Load() {
		return broker.ErrNotLeader
	}
	return nil
}
func (t *fakeTerm) Resign(context.Context) error {
	t.resigned.Store(true)
	t.end()
	return nil
}

// fenceRecorder is the real in-memory store, noting which lease writes
// carried a fence.
type fenceRecorder struct {
	broker.LeaseStore
	mu      sync.Mutex
	fenced  []int64 // the fence revision of each fenced UpdateLease(s)
	plain   int
	deletes []int64 // fence revisions of DeleteIntent
}

func (r *fenceRecorder) note(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if f, ok := broker.FenceFrom(ctx); ok {
		r.fenced = append(r.fenced, f.Revision)
	} else {
		r.plain++
	}
}

func (r *fenceRecorder) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	r.note(ctx)
	return r.LeaseStore.UpdateLease(ctx, l)
}

func (r *fenceRecorder) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	r.note(ctx)
	return r.LeaseStore.UpdateLeases(ctx, ls)
}

func (r *fenceRecorder) DeleteIntent(ctx context.Context, id string) error {
	r.mu.Lock()
	f, _ := broker.FenceFrom(ctx)
	r.deletes = append(r.deletes, f.Revision)
	r.mu.Unlock()
	return r.LeaseStore.DeleteIntent(ctx, id)
}

// TestUnitOnlyALeaderDoesBackgroundWork: a broker of a group serves calls
// before it leads but runs no expiry (no timer on the clock, an expired
// lease stays ACTIVE); once granted a term it rebuilds its queue from the
// store and revokes what is due, with fenced writes; when the term ends
// its loops stop (it campaigns again), and a lease that expires then is
// left alone until the next term.
func TestUnitOnlyALeaderDoesBackgroundWork(t *testing.T) {
	lead := newFakeLeadership()
	var rec *fenceRecorder
	u := newUnstarted(t, func(c *broker.Config) {
		c.Leadership = lead
		rec = &fenceRecorder{LeaseStore: c.Store}
		c.Store = rec
	})
	if err := u.b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	lead.waitCampaigning(t)
	l1, _ := u.issue(roleRO, time.Minute, "svc")
	rec.mu.Lock()
	// The issue's promotion to Active: written unfenced by whichever
	// instance issued, as the lease itself is.
	rec.plain = 0
	rec.mu.Unlock()
	u.clock.Advance(2 * time.Minute)
	if n := u.clock.Waiters(); n != 0 {
		t.Fatalf("a follower armed %d timers: its expiry or maintenance loop runs", n)
	}
	if got := u.lease(l1.ID); got.State != broker.StateActive || !u.userExists(l1.Username) {
		t.Fatalf("a follower expired a lease: %s", got.State)
	}

	term1 := newFakeTerm(7)
	lead.grant <- term1
	u.waitState(l1.ID, broker.StateExpired)
	if u.userExists(l1.Username) {
		t.Error("the user of the expired lease is still there")
	}
	rec.mu.Lock()
	fenced, plain := rec.fenced, rec.plain
	rec.mu.Unlock()
	if len(fenced) == 0 || plain != 0 {
		t.Errorf("the leader's revocation wrote %d times fenced, %d times without a fence", len(fenced), plain)
	}
	for _, rev := range fenced {
		if rev != 7 {
			t.Errorf("fenced with revision %d, want the term's 7", rev)
		}
	}

	term1.end()
	lead.waitCampaigning(t) // the term's loops have returned
	l2, _ := u.issue(roleRO, time.Minute, "svc")
	u.clock.Advance(2 * time.Minute)
	if got := u.lease(l2.ID); got.State != broker.StateActive {
		t.Fatalf("a deposed broker expired a lease: %s", got.State)
	}
	term2 := newFakeTerm(9)
	lead.grant <- term2
	u.waitState(l2.ID, broker.StateExpired)

	// Close hands leadership over.
	if err := u.b.Close(); err != nil {
		t.Fatal(err)
	}
	if !term2.resigned.Load() {
		t.Error("Close did not resign the term")
	}
}

// TestUnitReconcileInAGroupWaitsForTwoSweepsAndConfirms: with
// ReconcileConfirm, an unknown user and an intent left by a crash are
// acted on only when a second sweep at least that long after the first
// agrees; the leader confirms its term before each DROP, and a deposed
// one drops nothing. The wall clock is stepped (Step) so that no loop's
// timer fires and the test's sweeps are the only ones.
func TestUnitReconcileInAGroupWaitsForTwoSweepsAndConfirms(t *testing.T) {
	const confirm = 30 * time.Second
	lead := newFakeLeadership()
	u := newUnstarted(t, func(c *broker.Config) {
		c.Leadership = lead
		c.ReconcileConfirm = confirm
	})
	ctx := context.Background()
	u.db.AddUser(fakedb.User{Name: "cb_unknown"})
	u.db.AddUser(fakedb.User{Name: "cb_crashed"})
	crashed := broker.Intent{LeaseID: strings.Repeat("a", 32), Target: "main", Username: "cb_crashed", ProxyRole: "read_only_role", CreateTime: unitT0}
	mustPut(t, u.store, crashed)
	if err := u.b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	lead.waitCampaigning(t)

	// Not leading: nothing is dropped.
	res, err := u.b.Reconcile(ctx)
	if err != nil || res.UsersDropped+res.IntentsSettled != 0 || res.Pending != 2 {
		t.Fatalf("first sweep, not leading: %+v, %v; want 2 pending", res, err)
	}
	u.clock.Step(confirm)
	if _, err := u.b.Reconcile(ctx); !errors.Is(err, broker.ErrNotLeader) {
		t.Fatalf("a broker that does not lead: reconcile = %v, want ErrNotLeader", err)
	}
	if !u.userExists("cb_unknown") || !u.userExists("cb_crashed") {
		t.Fatal("a broker that does not lead dropped a user")
	}

	// Leading. The term's own first sweep starts the count anew.
	term := newFakeTerm(3)
	term.deposed.Store(true) // first, a term that Confirm finds gone
	lead.grant <- term
	waitFor(t, "the term's first sweep", func() bool { return u.clock.Waiters() > 0 })
	u.clock.Step(confirm - time.Second)
	res, err = u.b.Reconcile(ctx)
	if err != nil || res.Pending != 2 || res.UsersDropped+res.IntentsSettled != 0 {
		t.Fatalf("second sweep %s after the first: %+v, %v; want both still pending", confirm-time.Second, res, err)
	}
	if term.confirms.Load() != 0 {
		t.Errorf("Confirm called %d times before anything was to be dropped", term.confirms.Load())
	}
	u.clock.Step(time.Second)
	if _, err := u.b.Reconcile(ctx); !errors.Is(err, broker.ErrNotLeader) {
		t.Fatalf("reconcile of a deposed leader = %v, want ErrNotLeader", err)
	}
	if term.confirms.Load() == 0 || !u.userExists("cb_unknown") || !u.userExists("cb_crashed") {
		t.Fatalf("a leader whose term Confirm refused dropped a user (confirms %d)", term.confirms.Load())
	}
	term.deposed.Store(false)
	res, err = u.b.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.UsersDropped != 1 || res.IntentsSettled != 1 || res.Pending != 0 {
		t.Fatalf("sweep %s after the first: %+v, want one user dropped and one intent settled", confirm, res)
	}
	if u.userExists("cb_unknown") || u.userExists("cb_crashed") {
		t.Fatal("users left after a confirmed sweep")
	}

	// A suspect that goes away between sweeps starts over.
	u.db.AddUser(fakedb.User{Name: "cb_late"})
	if res, _ := u.b.Reconcile(ctx); res.Pending != 1 {
		t.Fatalf("new unknown user: %+v, want 1 pending", res)
	}
	u.db.DropUser("cb_late")
	if res, _ := u.b.Reconcile(ctx); res.Pending != 0 {
		t.Fatalf("after it went: %+v", res)
	}
	u.db.AddUser(fakedb.User{Name: "cb_late"})
	u.clock.Step(confirm)
	if res, _ := u.b.Reconcile(ctx); res.UsersDropped != 0 || res.Pending != 1 {
		t.Fatalf("a suspect seen again after a sweep without it was dropped at once: %+v", res)
	}
	// Only an unknown user to drop, and the term is gone: it stays.
	u.clock.Step(confirm)
	term.deposed.Store(true)
	if _, err := u.b.Reconcile(ctx); !errors.Is(err, broker.ErrNotLeader) || !u.userExists("cb_late") {
		t.Fatalf("deposed, with an unknown user confirmed by two sweeps: %v, user there: %t", err, u.userExists("cb_late"))
	}
	term.deposed.Store(false)
	if res, err := u.b.Reconcile(ctx); err != nil || res.UsersDropped != 1 || u.userExists("cb_late") {
		t.Fatalf("leading again: %+v, %v", res, err)
	}
}
