package broker_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
	"github.com/credbroker/credbroker/internal/fakeclock"
	"github.com/credbroker/credbroker/store/memstore"
)

// feedStore is a memstore several brokers share, with a change feed of its
// writes: an in-memory stand-in for store/etcd's (which the etcd tests and
// server's TestHA* run for real), so the broker's use of a feed is tested
// in milliseconds. Each follower gets every write in commit order, on a
// goroutine of its own, as from a watch.
type feedStore struct {
	broker.LeaseStore
	// hold, when set, makes UpdateLeases wait until it is closed.
	hold chan struct{}

	mu        sync.Mutex
	rev       uint64
	followers []*follower
}

type follower struct {
	mu     sync.Mutex
	queue  []broker.FeedEvent
	signal chan struct{}
}

var _ broker.LeaseFeed = (*feedStore)(nil)

func newFeedStore() *feedStore { return &feedStore{LeaseStore: memstore.New()} }

func (s *feedStore) FollowLeases(ctx context.Context, fn func(broker.FeedEvent)) error {
	f := &follower{signal: make(chan struct{}, 1)}
	s.mu.Lock()
	var live []broker.Lease
	err := s.LeaseStore.ScanExpiry(ctx, func(e broker.ExpiryEntry) bool {
		if l, err := s.LeaseStore.GetLease(ctx, e.LeaseID); err == nil {
			live = append(live, l)
		}
		return true
	})
	f.queue = append(f.queue, broker.FeedEvent{Kind: broker.FeedReset, Revision: s.rev, Leases: live})
	s.followers = append(s.followers, f)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	for {
		f.mu.Lock()
		q := f.queue
		f.queue = nil
		f.mu.Unlock()
		for _, ev := range q {
			fn(ev)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-f.signal:
		}
	}
}

// emit sends a written lease to every follower; s.mu is held.
func (s *feedStore) emitLocked(l broker.Lease, created bool) {
	s.rev++
	ev := broker.FeedEvent{Kind: broker.FeedLease, Revision: s.rev, Lease: l.Clone(), Created: created}
	for _, f := range s.followers {
		f.mu.Lock()
		f.queue = append(f.queue, ev)
		f.mu.Unlock()
		select {
		case f.signal <- struct{}{}:
		default:
		}
	}
}

func (s *feedStore) CreateLease(ctx context.Context, l *broker.Lease) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.LeaseStore.CreateLease(ctx, l)
	if err == nil {
		s.emitLocked(*l, true)
	}
	return err
}

func (s *feedStore) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out, err := s.LeaseStore.UpdateLease(ctx, l)
	if err == nil {
		s.emitLocked(out, false)
	}
	return out, err
}

func (s *feedStore) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	if s.hold != nil {
		<-s.hold
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out, errs := s.LeaseStore.UpdateLeases(ctx, ls)
	for i := range out {
		if errs[i] == nil {
			s.emitLocked(out[i], false)
		}
	}
	return out, errs
}

// group is two brokers on one feedStore and one fakedb: a leads, b stands by.
type group struct {
	store *feedStore
	db    *fakedb.DB
	clock *fakeclock.Clock
	a, b  *broker.Broker
}

func newGroup(t *testing.T) *group { return newGroupWith(t, nil) }

// newGroupWith is newGroup with b's database wrapped by wrapB.
func newGroupWith(t *testing.T, wrapB func(broker.Database) broker.Database) *group {
	t.Helper()
	g := &group{store: newFeedStore(), db: fakedb.New(), clock: fakeclock.New(unitT0)}
	start := func(name string, standby bool) *broker.Broker {
		var db broker.Database = g.db
		if standby && wrapB != nil {
			db = wrapB(db)
		}
		b, err := broker.New(broker.Config{
			Store:     g.store,
			Databases: map[string]broker.Database{"main": db},
			Roles: []broker.Role{
				{Name: roleRO, Target: "main", ProxyRole: "read_only_role", DefaultTTL: 15 * time.Minute, MaxTTL: time.Hour},
			},
			Clock:     g.clock,
			IssuePool: -1,
			Instance:  name,
			Standby:   standby,
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = b.Close() })
		return b
	}
	g.a = start("a", false)
	g.b = start("b", true)
	return g
}

// events records a broker's lifecycle events.
type events struct {
	mu  sync.Mutex
	evs []broker.AuditEvent
}

func recordEvents(t *testing.T, b *broker.Broker) *events {
	e := &events{}
	t.Cleanup(b.WatchLifecycle(func(ev broker.AuditEvent) {
		e.mu.Lock()
		e.evs = append(e.evs, ev)
		e.mu.Unlock()
	}))
	return e
}

func (e *events) has(id, action string, remote bool) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.ContainsFunc(e.evs, func(ev broker.AuditEvent) bool {
		return ev.LeaseID == id && ev.Action == action && ev.Remote == remote
	})
}

// noEvent fails if ch holds an event.
func noEvent(t *testing.T, ch <-chan broker.Event, why string) {
	t.Helper()
	select {
	case ev := <-ch:
		t.Errorf("%s: got %v for %s (revision %d)", why, ev.Type, ev.Lease.ID, ev.Lease.Revision)
	default:
	}
}

// A subscriber on one instance hears of a renewal and a revocation made
// on the other, once each; a revocation on its own instance, which the
// feed reports again, reaches it once.
func TestUnitFeedEventsReachEveryInstanceOnce(t *testing.T) {
	g := newGroup(t)
	bEvents := recordEvents(t, g.b)
	ctx := context.Background()

	l, _, err := g.a.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to hear of the issue", func() bool { return bEvents.has(l.ID, broker.AuditIssue, true) })
	ch, unsubscribe := g.b.Subscribe(l.ID)
	defer unsubscribe()

	g.clock.Advance(time.Minute)
	renewed, err := g.a.Renew(ctx, l.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, ch); ev.Type != broker.EventRenewed || ev.Lease.Revision != renewed.Revision {
		t.Errorf("on b: %v at revision %d, want the renewal on a (revision %d)", ev.Type, ev.Lease.Revision, renewed.Revision)
	}

	if _, err := g.b.Revoke(ctx, l.ID); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, ch); ev.Type != broker.EventRevoked {
		t.Errorf("on b: %v, want EventRevoked", ev.Type)
	}
	// b's feed reports b's own revocation (and its REVOKING step) again.
	waitFor(t, "b's feed to report its own revocation", func() bool { return bEvents.has(l.ID, broker.AuditRevoke, true) })
	noEvent(t, ch, "after b's own revocation came back on its feed")

	other, _, err := g.b.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	ch2, unsubscribe2 := g.b.Subscribe(other.ID)
	defer unsubscribe2()
	if _, err := g.a.Revoke(ctx, other.ID); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, ch2); ev.Type != broker.EventRevoked || ev.Lease.State != broker.StateRevoked {
		t.Errorf("on b: %v (%s), want EventRevoked of a's revocation", ev.Type, ev.Lease.State)
	}
	noEvent(t, ch2, "after a's revocation")
}

// The leader expires, at its expire time, a lease the standby issued; the
// standby revokes nothing.
func TestUnitFeedLeaderExpiresWhatTheStandbyIssued(t *testing.T) {
	g := newGroup(t)
	aEvents := recordEvents(t, g.a)
	bEvents := recordEvents(t, g.b)
	l, c, err := g.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, TTL: time.Minute, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a to hear of the issue", func() bool { return aEvents.has(l.ID, broker.AuditIssue, true) })
	waitFor(t, "a's dispatcher to arm its timer", func() bool {
		return g.clock.WaitersUntil(l.ExpireTime) > g.clock.WaitersUntil(l.ExpireTime.Add(-time.Nanosecond))
	})
	g.clock.Advance(time.Minute)
	waitFor(t, "a to expire it", func() bool { return aEvents.has(l.ID, broker.AuditExpire, false) })
	got, err := g.store.GetLease(context.Background(), l.ID)
	if err != nil || got.State != broker.StateExpired || !got.EndTime.Equal(l.ExpireTime) {
		t.Errorf("lease %s ended %v (%v), want expired at %v", got.State, got.EndTime, err, l.ExpireTime)
	}
	if _, ok := g.db.User(c.Username); ok {
		t.Error("the user is still there")
	}
	waitFor(t, "b to hear of the expiry", func() bool { return bEvents.has(l.ID, broker.AuditExpire, true) })
	if bEvents.has(l.ID, broker.AuditExpire, false) {
		t.Error("the standby expired the lease too")
	}

	// The standby becomes the leader: it has every live lease already.
	l2, _, err := g.a.Issue(context.Background(), broker.IssueRequest{Role: roleRO, TTL: time.Minute, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to hear of the second issue", func() bool { return bEvents.has(l2.ID, broker.AuditIssue, true) })
	g.a.SetLeading(false)
	g.b.SetLeading(true)
	waitFor(t, "b's dispatcher to arm its timer", func() bool {
		return g.clock.WaitersUntil(l2.ExpireTime) > g.clock.WaitersUntil(l2.ExpireTime.Add(-time.Nanosecond))
	})
	g.clock.Advance(time.Minute)
	waitFor(t, "b, now leading, to expire the lease a issued", func() bool { return bEvents.has(l2.ID, broker.AuditExpire, false) })
	if aEvents.has(l2.ID, broker.AuditExpire, false) {
		t.Error("a expired a lease after it stopped leading")
	}
}

// resetFollowers sends every follower a new reset, as the etcd feed does
// after a compaction: what changed in between was never reported.
func (s *feedStore) resetFollowers(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var live []broker.Lease
	err := s.LeaseStore.ScanExpiry(context.Background(), func(e broker.ExpiryEntry) bool {
		if l, err := s.LeaseStore.GetLease(context.Background(), e.LeaseID); err == nil {
			live = append(live, l)
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	s.rev++
	for _, f := range s.followers {
		f.mu.Lock()
		f.queue = append(f.queue, broker.FeedEvent{Kind: broker.FeedReset, Revision: s.rev, Leases: live})
		f.mu.Unlock()
		select {
		case f.signal <- struct{}{}:
		default:
		}
	}
}

// A lease that ended in a gap of the feed (its changes compacted away) is
// missing from the next reset: the broker reads it, and its subscribers
// and watchers hear of its end; one still live stays in the queue.
func TestUnitFeedResetSettlesWhatEndedInAGap(t *testing.T) {
	g := newGroup(t)
	bEvents := recordEvents(t, g.b)
	ctx := context.Background()
	ended, _, err := g.a.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	kept, _, err := g.a.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to hear of both issues", func() bool {
		return bEvents.has(ended.ID, broker.AuditIssue, true) && bEvents.has(kept.ID, broker.AuditIssue, true)
	})
	ch, unsubscribe := g.b.Subscribe(ended.ID)
	defer unsubscribe()

	// Written behind the feed's back.
	l, err := g.store.LeaseStore.GetLease(ctx, ended.ID)
	if err != nil {
		t.Fatal(err)
	}
	l.State, l.EndTime = broker.StateRevoked, g.clock.Now()
	if _, err := g.store.LeaseStore.UpdateLease(ctx, l); err != nil {
		t.Fatal(err)
	}
	g.store.resetFollowers(t)
	if ev := nextEvent(t, ch); ev.Type != broker.EventRevoked {
		t.Errorf("on b: %v, want EventRevoked of the lease that ended in the gap", ev.Type)
	}
	waitFor(t, "b's watchers to hear of it", func() bool { return bEvents.has(ended.ID, broker.AuditRevoke, true) })
	if bEvents.has(kept.ID, broker.AuditRevoke, true) {
		t.Error("the lease still live was reported ended")
	}
}

// heldDB holds its first DeleteUser until release is closed.
type heldDB struct {
	broker.Database
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (d *heldDB) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	first := false
	d.once.Do(func() { first = true })
	if first {
		close(d.entered)
		<-d.release
	}
	return d.Database.DeleteUser(ctx, req)
}

// A revocation begun on the standby that seems stuck is taken over by the
// leader after revokeTakeover (30s); when the standby's revocation then
// finishes, it finds the lease revoked and reports success, not a
// conflict.
func TestUnitFeedLeaderTakesOverAStuckRevocation(t *testing.T) {
	held := &heldDB{entered: make(chan struct{}), release: make(chan struct{})}
	g := newGroupWith(t, func(db broker.Database) broker.Database { held.Database = db; return held })
	aEvents := recordEvents(t, g.a)
	ctx := context.Background()
	l, c, err := g.a.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		l   broker.Lease
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := g.b.Revoke(ctx, l.ID)
		done <- result{l, err}
	}()
	<-held.entered // REVOKING is stored; the standby's DROP hangs
	takeover := g.clock.Now().Add(30 * time.Second)
	waitFor(t, "the leader to schedule the takeover", func() bool {
		return g.clock.WaitersUntil(takeover) > g.clock.WaitersUntil(takeover.Add(-time.Nanosecond))
	})
	if aEvents.has(l.ID, broker.AuditRevoke, false) {
		t.Fatal("the leader revoked before the takeover delay")
	}
	g.clock.Advance(30 * time.Second)
	waitFor(t, "the leader to finish the revocation", func() bool { return aEvents.has(l.ID, broker.AuditRevoke, false) })
	if _, ok := g.db.User(c.Username); ok {
		t.Error("the user is still there")
	}
	close(held.release)
	r := <-done
	if r.err != nil || r.l.State != broker.StateRevoked {
		t.Errorf("the standby's Revoke: %v, %v; want the revoked lease and no error", r.l.State, r.err)
	}
}

// The promotion of an issued lease from ISSUING to ACTIVE, which another
// instance hears of on its feed, is no renewal: a subscriber there gets
// no event for it.
func TestUnitFeedPromotionIsNoRenewal(t *testing.T) {
	g := newGroup(t)
	bEvents := recordEvents(t, g.b)
	ctx := context.Background()
	g.store.hold = make(chan struct{}) // a's promotion waits until b's subscriber is there

	l, _, err := g.a.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to hear of the issue", func() bool { return bEvents.has(l.ID, broker.AuditIssue, true) })
	ch, unsubscribe := g.b.Subscribe(l.ID)
	defer unsubscribe()
	close(g.store.hold)
	g.a.WaitPromotions()
	if got, err := g.store.GetLease(ctx, l.ID); err != nil || got.State != broker.StateActive {
		t.Fatalf("after the promotion: %v, %v", got.State, err)
	}

	// The feed is in order: once b heard of a later revocation, it has
	// applied the promotion.
	other, _, err := g.a.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.a.Revoke(ctx, other.ID); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to hear of the later revocation", func() bool { return bEvents.has(other.ID, broker.AuditRevoke, true) })
	noEvent(t, ch, "after the promotion")
}

// earlyIndex is a feedStore whose expiry index holds instants earlier
// than the leases' own, as ScanExpiry allows (the etcd store leaves a
// renewed lease's entry where it was).
type earlyIndex struct {
	*feedStore
	by time.Duration
}

func (s *earlyIndex) ScanExpiry(ctx context.Context, fn func(broker.ExpiryEntry) bool) error {
	return s.feedStore.ScanExpiry(ctx, func(e broker.ExpiryEntry) bool {
		e.Expire = e.Expire.Add(-s.by)
		return fn(e)
	})
}

// A new leader queues a lease the feed told of at its expiry, not at the
// earlier instant the expiry index may hold for it: taking the index's
// would have it read every renewed lease at once, in the middle of a
// failover.
func TestUnitNewLeaderQueuesFromTheFeedNotAnEarlyIndex(t *testing.T) {
	lead := newFakeLeadership()
	const early = 10 * time.Minute
	u := newUnstarted(t, func(c *broker.Config) {
		c.Leadership = lead
		c.Store = &earlyIndex{feedStore: &feedStore{LeaseStore: c.Store}, by: early}
	})
	if err := u.b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	lead.waitCampaigning(t)
	evs := recordEvents(t, u.b)
	// An odd TTL, so that no loop's timer shares its instant.
	l, _ := u.issue(roleRO, 777*time.Second, "svc")
	waitFor(t, "the feed to report the issue", func() bool { return evs.has(l.ID, broker.AuditIssue, true) })

	lead.grant <- newFakeTerm(3)
	armedAt := func(at time.Time) int {
		return u.clock.WaitersUntil(at) - u.clock.WaitersUntil(at.Add(-time.Nanosecond))
	}
	waitFor(t, "the leader's dispatcher to arm its timer at the lease's expiry", func() bool { return armedAt(l.ExpireTime) > 0 })
	if n := armedAt(l.ExpireTime.Add(-early)); n != 0 {
		t.Errorf("%d timers at the index's early instant", n)
	}
}
