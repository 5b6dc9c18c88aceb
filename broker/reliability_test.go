package broker_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
	"github.com/credbroker/credbroker/internal/fakeclock"
	"github.com/credbroker/credbroker/store"
)

// newUnitOnBolt is newUnit over the real bbolt store in t.TempDir(),
// wrapped in a faultStore; u.store is the bare store, for the test's own
// reads.
func newUnitOnBolt(t *testing.T, mods ...func(*broker.Config)) (*unit, *crashSwitch) {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "leases.db"), store.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() }) // after the broker's Close (cleanups run last first)
	sw := &crashSwitch{}
	wrap := func(c *broker.Config) { c.Store = faultStore{LeaseStore: st, sw: sw} }
	u := newUnit(t, append([]func(*broker.Config){wrap}, mods...)...)
	u.store = st
	return u, sw
}

// failsLeft is how many injected transient faults have not fired yet.
func (c *crashSwitch) failsLeft() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failN
}

// runQueue moves the clock from one expiry-queue entry to the next, each
// time once the dispatcher's timer for it is armed, until done holds. It
// fails the test if the queue is empty while done does not hold: a lease
// that left the queue unfinished is a lost revocation.
func (u *unit) runQueue(what string, done func() bool) {
	u.t.Helper()
	runQueue(u.t, u.b, u.clock, 30, what, done)
}

// runQueue is unit.runQueue for any broker on a fake clock, giving up
// after limit queue entries.
func runQueue(t *testing.T, b *broker.Broker, clock *fakeclock.Clock, limit int, what string, done func() bool) {
	t.Helper()
	for i := 0; ; i++ {
		if i == limit {
			t.Fatalf("%s: not done after %d queue entries", what, limit)
		}
		var next time.Time
		waitFor(t, what+" (or a lease due later in the queue, its timer armed)", func() bool {
			if done() {
				return true
			}
			n, ok := b.QueueNext()
			next = n
			return ok && n.After(clock.Now()) &&
				clock.WaitersUntil(n) > clock.WaitersUntil(n.Add(-time.Nanosecond))
		})
		if done() {
			return
		}
		clock.Advance(next.Sub(clock.Now()))
	}
}

// Point 1 of issue 10: a store error while the expiry manager revokes a
// lease puts it back in the queue with backoff; it is not lost until the
// next start.
func TestUnitExpiryRetriesAFailedRevokingWriteOnBolt(t *testing.T) {
	u, sw := newUnitOnBolt(t)
	l, c := u.issue(roleRO, time.Minute, "svc")
	sw.failNextCalls("UpdateLease:revoking", 1, errors.New("injected: store unavailable"))

	u.waitArmed(l.ExpireTime)
	u.clock.Advance(time.Minute)
	waitFor(t, "the injected failure of the Revoking write", func() bool { return sw.failsLeft() == 0 })
	var next time.Time
	waitFor(t, "the lease back in the expiry queue", func() bool {
		n, ok := u.b.QueueNext()
		next = n
		return ok && n.After(u.clock.Now())
	})
	if wait := next.Sub(u.clock.Now()); wait < 500*time.Millisecond || wait > time.Second {
		t.Errorf("retried in %v, want backoff(1) within [500ms, 1s]", wait)
	}
	if got := u.lease(l.ID); got.State != broker.StateActive || !u.userExists(c.Username) {
		t.Fatalf("after the failed write: state %s, user exists %v; want active with its user", got.State, u.userExists(c.Username))
	}
	u.waitArmed(next)
	u.clock.Advance(next.Sub(u.clock.Now()))
	got := u.waitState(l.ID, broker.StateExpired)
	if u.userExists(c.Username) {
		t.Error("the user survived its lease")
	}
	if !got.EndTime.Equal(next) {
		t.Errorf("ended at %v, want at the retry %v", got.EndTime, next)
	}
	if n := u.b.QueueLen(); n != 0 {
		t.Errorf("%d leases left in the queue", n)
	}
}

// The batch variant: an expiry batch whose UpdateLeases fails, on a store
// that keeps failing for a while, loses none of its leases.
func TestUnitExpiryBatchRetriesAFailedBatchWriteOnBolt(t *testing.T) {
	u, sw := newUnitOnBolt(t, func(c *broker.Config) {
		c.RevokeConcurrency = 1 // all due leases in one batch
		c.RevokeRate = 1000
	})
	const n = 4
	var leases []broker.Lease
	var users []string
	for range n {
		l, c := u.issue(roleRO, time.Minute, "svc")
		leases = append(leases, l)
		users = append(users, c.Username)
	}
	// The batch's write fails, and so does the next write of each lease.
	sw.failNextCalls("UpdateLease:revoking", 1+n, errors.New("injected: store unavailable"))

	u.waitArmed(leases[0].ExpireTime)
	u.clock.Advance(time.Minute)
	u.runQueue("every lease expired", func() bool {
		for _, l := range leases {
			if u.lease(l.ID).State != broker.StateExpired {
				return false
			}
		}
		return true
	})
	if left := sw.failsLeft(); left != 0 {
		t.Errorf("%d injected failures never fired: the batch path did not run as planned", left)
	}
	for _, name := range users {
		if u.userExists(name) {
			t.Errorf("user %s survived its lease", name)
		}
	}
	if q := u.b.QueueLen(); q != 0 {
		t.Errorf("%d leases left in the queue", q)
	}
}

// deleteCalls is how many DeleteUser and DeleteUsers calls fakedb received.
func (u *unit) deleteCalls() int {
	return u.db.CallCount(fakedb.DeleteUser) + u.db.CallCount(fakedb.DeleteUsers)
}

// Point 4 of issue 10: a revocation on disconnect that fails follows the
// expiry manager's backoff and ends REVOKE_FAILED after RevokeRetries,
// instead of being tried again on every maintenance tick.
func TestUnitRevokeOnDisconnectBacksOff(t *testing.T) {
	u := newUnit(t, func(c *broker.Config) {
		c.DisconnectGrace = 30 * time.Second
		c.RetryBaseDelay = 4 * time.Second
		c.RetryMaxDelay = 16 * time.Second
		c.FailedRetryInterval = 10 * time.Minute
	})
	l, c, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, Client: "svc", RevokeOnDisconnect: true})
	if err != nil {
		t.Fatal(err)
	}
	u.db.FailUser(c.Username, fmt.Errorf("%w: connection refused", broker.ErrUnavailable))

	u.waitArmed(u.clock.Now().Add(time.Second)) // the maintenance tick
	u.clock.Advance(30 * time.Second)
	// Exponential from 4s, full jitter over the upper half of each step.
	windows := map[int][2]time.Duration{1: {2 * time.Second, 4 * time.Second}, 2: {4 * time.Second, 8 * time.Second}}
	var got broker.Lease
	for attempt := 1; ; attempt++ {
		got = u.waitLease(l.ID, fmt.Sprintf("attempt %d", attempt), func(l broker.Lease) bool { return l.RevokeAttempts >= attempt })
		if attempt == 3 {
			break
		}
		wait := got.NextAttempt.Sub(u.clock.Now())
		if w := windows[attempt]; wait < w[0] || wait > w[1] {
			t.Errorf("retry after attempt %d in %v, want within [%v, %v]", attempt, wait, w[0], w[1])
		}
		// Up to 1ns before the retry, past at least one maintenance tick.
		u.waitArmed(got.NextAttempt)
		u.clock.Advance(wait - time.Nanosecond)
		u.waitArmed(u.clock.Now().Add(time.Second)) // the tick ran
		if n := u.deleteCalls(); n != attempt {
			t.Fatalf("%d drops before the backoff after attempt %d ended", n, attempt)
		}
		u.clock.Advance(time.Nanosecond)
	}
	if got.State != broker.StateRevokeFailed {
		t.Fatalf("after 3 failed attempts: state %s, want revoke_failed", got.State)
	}
	if want := u.clock.Now().Add(10 * time.Minute); !got.NextAttempt.Equal(want) {
		t.Errorf("revoke_failed retried at %v, want after FailedRetryInterval (%v)", got.NextAttempt, want)
	}
	u.tick(5)
	if n := u.deleteCalls(); n != 3 {
		t.Errorf("%d drops after REVOKE_FAILED within 5s, want 3 in all", n)
	}

	// The target is back: the expiry manager's later retry ends it REVOKED.
	u.db.FailUser(c.Username, nil)
	u.runQueue("the lease revoked", func() bool { return u.lease(l.ID).State == broker.StateRevoked })
	if u.userExists(c.Username) {
		t.Error("the user survived")
	}
}

// Point 7 of issue 10: the expiry queue follows the wall clock. A step
// forward revokes what fell due within a maintenance tick, although the
// dispatcher's timer (monotonic) is still far off; a step back delays
// expiry until the wall clock reaches the lease's expire time.
func TestUnitExpiryFollowsWallClockSteps(t *testing.T) {
	t.Run("forward", func(t *testing.T) {
		u := newUnit(t)
		l, c := u.issue(roleRO, 10*time.Minute, "svc")
		u.waitArmed(l.ExpireTime)
		u.clock.Step(time.Hour)
		if got := u.lease(l.ID).State; got != broker.StateActive {
			t.Fatalf("state %s right after the step, before any timer fired", got)
		}
		u.tick(1)
		got := u.waitState(l.ID, broker.StateExpired)
		if u.userExists(c.Username) {
			t.Error("the user survived its lease")
		}
		if got.EndTime.Before(got.ExpireTime) {
			t.Errorf("ended at %v, before its expire time %v", got.EndTime, got.ExpireTime)
		}
	})
	t.Run("back", func(t *testing.T) {
		u := newUnit(t)
		l, _ := u.issue(roleRO, time.Minute, "svc")
		u.waitArmed(l.ExpireTime)
		u.clock.Step(-time.Hour)
		// The dispatcher's timer fires a minute on, an hour before the
		// lease's expire time by the wall clock: it must wait again.
		u.clock.Advance(time.Minute)
		u.waitArmed(l.ExpireTime)
		if got := u.lease(l.ID).State; got != broker.StateActive {
			t.Fatalf("state %s an hour before its expire time", got)
		}
		u.clock.Advance(time.Hour - time.Nanosecond)
		u.waitArmed(l.ExpireTime)
		if got := u.lease(l.ID).State; got != broker.StateActive {
			t.Fatalf("state %s 1ns before its expire time", got)
		}
		u.clock.Advance(time.Nanosecond)
		if got := u.waitState(l.ID, broker.StateExpired); !got.EndTime.Equal(got.ExpireTime) {
			t.Errorf("ended at %v, want at its expire time %v", got.EndTime, got.ExpireTime)
		}
	})
}

// A renewal the batch sends down the single-lease path (here: PostgreSQL
// refused the user with an error of its own) is capped at MaxExpireTime
// there too, lease and VALID UNTIL alike.
func TestUnitRenewAloneCapsAtMaxTTL(t *testing.T) {
	u := newUnit(t)
	l, c := u.issue(roleRO, 0, "svc")
	u.db.FailNext(fakedb.RenewUsers, errors.New("injected: not unavailable, this user's own"))
	got, err := u.b.Renew(context.Background(), l.ID, 2*time.Hour)
	if err != nil {
		t.Fatalf("Renew: %v", err)
	}
	if u.db.CallCount(fakedb.RenewUser) == 0 {
		t.Fatal("the single-lease path did not run")
	}
	if !got.ExpireTime.Equal(l.MaxExpireTime) || !u.lease(l.ID).ExpireTime.Equal(l.MaxExpireTime) {
		t.Errorf("renewed to %v (stored %v), want capped at %v", got.ExpireTime, u.lease(l.ID).ExpireTime, l.MaxExpireTime)
	}
	user, _ := u.db.User(c.Username)
	if want := l.MaxExpireTime.Add(broker.DefaultValidUntilGrace); !user.ValidUntil.Equal(want) {
		t.Errorf("VALID UNTIL %v, want %v", user.ValidUntil, want)
	}
}

// Point 8 of issue 10: a batched renewal stored while PostgreSQL refused
// the new VALID UNTIL leaves the user's safety net behind the lease; the
// next renewal, though the lease is at its max TTL and has nothing left to
// extend, brings VALID UNTIL up to the lease's expiry.
func TestUnitValidUntilCatchesUpAfterAnUnavailableRenewal(t *testing.T) {
	for _, alone := range []bool{false, true} {
		t.Run(map[bool]string{false: "batched", true: "alone"}[alone], func(t *testing.T) {
			testValidUntilCatchesUp(t, alone)
		})
	}
}

// testValidUntilCatchesUp runs the catching-up renewal through the batch,
// or (alone) through the single-lease path: a failed first read sends it
// there.
func testValidUntilCatchesUp(t *testing.T, alone bool) {
	sw := &crashSwitch{}
	u := newUnit(t, func(c *broker.Config) { c.Store = faultStore{LeaseStore: c.Store, sw: sw} })
	ctx := context.Background()
	l, c := u.issue(roleRO, 0, "svc")
	u.db.FailNext(fakedb.RenewUsers, fmt.Errorf("%w: injected: connection reset", broker.ErrUnavailable))
	if _, err := u.b.Renew(ctx, l.ID, 2*time.Hour); !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("renewal while PostgreSQL is unavailable: %v, want ErrUnavailable", err)
	}
	stored := u.lease(l.ID)
	if !stored.ExpireTime.Equal(l.MaxExpireTime) || !stored.ValidUntilBehind {
		t.Fatalf("after the batch: expire %v, valid until behind %v; want the max TTL stored and the lag recorded", stored.ExpireTime, stored.ValidUntilBehind)
	}

	if alone {
		sw.failNextCalls("GetLease", 1, errors.New("injected: read failed"))
	}
	got, err := u.b.Renew(ctx, l.ID, 2*time.Hour) // at the max TTL: nothing to extend
	if err != nil {
		t.Fatalf("renewal at the max TTL: %v", err)
	}
	if ran := u.db.CallCount(fakedb.RenewUser) > 0; ran != alone {
		t.Errorf("the single-lease path ran: %v, want %v", ran, alone)
	}
	user, _ := u.db.User(c.Username)
	if user.ValidUntil.Before(got.ExpireTime) {
		t.Errorf("VALID UNTIL %v is before the lease's expiry %v", user.ValidUntil, got.ExpireTime)
	}
	if want := got.ExpireTime.Add(broker.DefaultValidUntilGrace); !user.ValidUntil.Equal(want) {
		t.Errorf("VALID UNTIL %v, want %v", user.ValidUntil, want)
	}
	if u.lease(l.ID).ValidUntilBehind {
		t.Error("the lag is still recorded after PostgreSQL took the new VALID UNTIL")
	}
	// Caught up: the next renewal at the cap skips PostgreSQL again.
	before := u.db.CallCount(fakedb.RenewUsers) + u.db.CallCount(fakedb.RenewUser)
	if _, err := u.b.Renew(ctx, l.ID, 2*time.Hour); err != nil {
		t.Fatal(err)
	}
	if after := u.db.CallCount(fakedb.RenewUsers) + u.db.CallCount(fakedb.RenewUser); after != before {
		t.Errorf("a renewal with nothing to extend and nothing behind went to PostgreSQL (%d calls)", after-before)
	}
}

// outcomeStore makes the next CreateLease return ErrUnknownOutcome, after
// committing it (commit) or without running it.
type outcomeStore struct {
	broker.LeaseStore
	commit bool
	armed  *atomic.Bool
}

func (s outcomeStore) CreateLease(ctx context.Context, l *broker.Lease) error {
	if !s.armed.CompareAndSwap(true, false) {
		return s.LeaseStore.CreateLease(ctx, l)
	}
	if s.commit {
		if err := s.LeaseStore.CreateLease(ctx, l); err != nil {
			return err
		}
	}
	return fmt.Errorf("injected: request timed out: %w", broker.ErrUnknownOutcome)
}

// Point 3 of issue 10: a CreateLease of unknown outcome either issues the
// credential with a lease that exists (its user exists, the lease is in
// the expiry queue) or leaves nothing (no user, no lease, no intent).
func TestUnitIssueWithUnknownOutcome(t *testing.T) {
	for _, backend := range []string{"memstore", "bbolt"} {
		for _, commit := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/committed=%v", backend, commit), func(t *testing.T) {
				armed := &atomic.Bool{}
				wrap := func(c *broker.Config) { c.Store = outcomeStore{LeaseStore: c.Store, commit: commit, armed: armed} }
				var u *unit
				if backend == "bbolt" {
					u, _ = newUnitOnBolt(t, wrap)
				} else {
					u = newUnit(t, wrap)
				}
				ctx := context.Background()
				armed.Store(true)
				l, cred, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
				if armed.Load() {
					t.Fatal("the injected fault did not fire")
				}
				intents, ierr := u.store.ListIntents(ctx)
				if ierr != nil {
					t.Fatal(ierr)
				}
				if len(intents) != 0 {
					t.Errorf("intents left: %v", intents)
				}
				if commit {
					if err != nil {
						t.Fatalf("Issue: %v; want the credential of the stored lease", err)
					}
					u.b.WaitPromotions()
					stored := u.lease(l.ID)
					if stored.State != broker.StateActive || stored.Revision < l.Revision || stored.Username != cred.Username {
						t.Errorf("stored lease %+v, returned %+v", stored, l)
					}
					if !u.userExists(cred.Username) {
						t.Error("the credential's user does not exist")
					}
					if next, ok := u.b.QueueNext(); !ok || !next.Equal(l.ExpireTime) || u.b.QueueLen() != 1 {
						t.Errorf("expiry queue: next %v (%v), %d entries; want the lease at %v", next, ok, u.b.QueueLen(), l.ExpireTime)
					}
					return
				}
				if err == nil {
					t.Fatal("Issue succeeded although the lease was never stored")
				}
				if !errors.Is(err, broker.ErrUnknownOutcome) || !errors.Is(err, broker.ErrUnavailable) {
					t.Errorf("error %v: want ErrUnknownOutcome, as ErrUnavailable", err)
				}
				if users := u.db.Usernames(); len(users) != 0 {
					t.Errorf("users left: %v", users)
				}
				leases, _, lerr := u.store.ListLeases(ctx, broker.LeaseFilter{})
				if lerr != nil || len(leases) != 0 {
					t.Errorf("leases left: %v (%v)", leases, lerr)
				}
			})
		}
	}
}

// hangingDB is a fakedb whose drops hang until released (or their context
// ends), as they do on a target that stopped answering.
type hangingDB struct {
	*fakedb.DB
	release chan struct{}
	waiting atomic.Int32 // drops hanging now
}

func (d *hangingDB) hang(ctx context.Context) error {
	d.waiting.Add(1)
	defer d.waiting.Add(-1)
	select {
	case <-d.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (d *hangingDB) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	if err := d.hang(ctx); err != nil {
		return err
	}
	return d.DB.DeleteUser(ctx, req)
}

func (d *hangingDB) DeleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	if err := d.hang(ctx); err != nil {
		errs := make([]error, len(reqs))
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	return d.DB.DeleteUsers(ctx, reqs)
}

// Point 5 of issue 10: a target whose drops hang holds only its own
// revocations; a healthy target's leases, due later, are revoked at once.
func TestUnitOneStuckTargetDoesNotStallAnother(t *testing.T) {
	dead := &hangingDB{DB: fakedb.New(), release: make(chan struct{})}
	u := newUnit(t, func(c *broker.Config) {
		c.Databases["dead"] = dead
		c.Roles = append(c.Roles, broker.Role{Name: "dead_ro", Target: "dead", ProxyRole: "read_only_role", DefaultTTL: 15 * time.Minute, MaxTTL: time.Hour})
		c.RevokeConcurrency = 2
		c.RevokeRate = 1000
	})
	t.Cleanup(func() { close(dead.release) }) // before the broker's Close
	var stuck []broker.Lease
	for range 8 {
		l, _ := u.issue("dead_ro", time.Minute, "svc")
		stuck = append(stuck, l)
	}
	healthy, c := u.issue(roleRO, 2*time.Minute, "svc")

	u.waitArmed(stuck[0].ExpireTime)
	u.clock.Advance(time.Minute)
	waitFor(t, "the dead target's workers to hang", func() bool { return dead.waiting.Load() == 2 })
	u.waitArmed(healthy.ExpireTime)
	u.clock.Advance(time.Minute)
	u.waitState(healthy.ID, broker.StateExpired)
	if u.userExists(c.Username) {
		t.Error("the healthy target's user survived its lease")
	}
	if n := dead.waiting.Load(); n != 2 {
		t.Errorf("%d drops hang on the dead target, want its 2 workers", n)
	}
	for _, l := range stuck {
		if s := u.lease(l.ID).State; s != broker.StateRevoking {
			t.Errorf("lease %s on the dead target is %s, want revoking", l.ID, s)
		}
	}
}

// TestUnitExpiryWaitsForTheDatabaseClock (issue 11: a clock step of two
// minutes on one instance revokes nothing early): this host's clock steps
// two minutes forward and the database's does not, so the lease is due by
// this host's clock only. The expiry manager asks the database, holds the
// lease (active, its user alive) and queues it again for when the
// database's clock reaches its expire time; then it expires it.
func TestUnitExpiryWaitsForTheDatabaseClock(t *testing.T) {
	u := newUnit(t, func(cfg *broker.Config) { cfg.CheckDatabaseClock = true })
	// The database's clock is 30 s behind this host's from the start, and
	// this host's then steps two minutes forward: by the database's clock
	// the lease has 90 s left when this host finds it due.
	dbClock := fakeclock.New(unitT0.Add(-30 * time.Second))
	u.db.SetClock(dbClock.Now)
	l, c := u.issue(roleRO, time.Minute, "svc")
	u.waitArmed(l.ExpireTime)

	u.clock.Step(2 * time.Minute) // this host only
	u.tick(1)                     // the dispatcher finds the lease due
	requeued := u.clock.Now().Add(90 * time.Second)
	waitFor(t, "the lease queued again for the database's expire time", func() bool {
		return u.clock.WaitersUntil(requeued) > u.clock.WaitersUntil(requeued.Add(-time.Nanosecond))
	})
	if got := u.lease(l.ID).State; got != broker.StateActive {
		t.Fatalf("state %s after this host's clock alone stepped past its expire time", got)
	}
	if !u.userExists(c.Username) {
		t.Fatal("the user was dropped before the database's clock reached its expire time")
	}

	dbClock.Advance(90 * time.Second)
	u.clock.Advance(90 * time.Second)
	got := u.waitState(l.ID, broker.StateExpired)
	if u.userExists(c.Username) {
		t.Error("the user survived its lease")
	}
	if got.EndTime.Before(got.ExpireTime) {
		t.Errorf("ended at %v, before its expire time %v", got.EndTime, got.ExpireTime)
	}
}
