package broker_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
	"github.com/credbroker/credbroker/internal/fakeclock"
	"github.com/credbroker/credbroker/store/memstore"
)

// The TestUnit tests run the broker's domain logic on the in-memory store
// and database, with a manual clock: no PostgreSQL, no file, so
// `go test -run Unit ./broker/` takes well under a second. What only a real
// PostgreSQL can show (sessions ended, VALID UNTIL, owned objects) stays
// in the tests that use newEnv.

// unitT0 is where the manual clock starts.
var unitT0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// unit is a broker over memstore and fakedb, with a manual clock.
type unit struct {
	t     *testing.T
	store broker.LeaseStore
	db    *fakedb.DB
	clock *fakeclock.Clock
	b     *broker.Broker
}

// newUnit returns a started broker with roles read_only and updater (15m
// default, 1h max), 3 revocation tries with backoff from 1s to 8s, and no
// issue pool unless a mod turns it on.
func newUnit(t *testing.T, mods ...func(*broker.Config)) *unit {
	t.Helper()
	u := newUnstarted(t, mods...)
	if err := u.b.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	return u
}

// newUnstarted is newUnit without Start.
func newUnstarted(t *testing.T, mods ...func(*broker.Config)) *unit {
	t.Helper()
	u := &unit{t: t, store: memstore.New(), db: fakedb.New(), clock: fakeclock.New(unitT0)}
	cfg := broker.Config{
		Store:     u.store,
		Databases: map[string]broker.Database{"main": u.db},
		Roles: []broker.Role{
			{Name: roleRO, Target: "main", ProxyRole: "read_only_role", DefaultTTL: 15 * time.Minute, MaxTTL: time.Hour},
			{Name: roleUpdater, Target: "main", ProxyRole: "updater_role", DefaultTTL: 15 * time.Minute, MaxTTL: time.Hour},
		},
		Clock:          u.clock,
		RetryBaseDelay: time.Second,
		RetryMaxDelay:  8 * time.Second,
		RevokeRetries:  3,
		IssuePool:      -1,
	}
	for _, m := range mods {
		m(&cfg)
	}
	b, err := broker.New(cfg)
	if err != nil {
		t.Fatalf("broker.New: %v", err)
	}
	u.b = b
	t.Cleanup(func() { _ = b.Close() })
	return u
}

func (u *unit) issue(role string, ttl time.Duration, client string) (broker.Lease, broker.Credential) {
	u.t.Helper()
	l, c, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: role, TTL: ttl, Client: client})
	if err != nil {
		u.t.Fatalf("Issue(%s, %v): %v", role, ttl, err)
	}
	// Tests that read the stored lease find it Active.
	u.b.WaitPromotions()
	return l, c
}

func (u *unit) lease(id string) broker.Lease {
	u.t.Helper()
	l, err := u.store.GetLease(context.Background(), id)
	if err != nil {
		u.t.Fatalf("GetLease(%s): %v", id, err)
	}
	return l
}

// waitLease waits, with a deadline, until cond holds for the stored lease.
func (u *unit) waitLease(id, what string, cond func(broker.Lease) bool) broker.Lease {
	u.t.Helper()
	var l broker.Lease
	waitFor(u.t, fmt.Sprintf("lease %s: %s", id, what), func() bool {
		l = u.lease(id)
		return cond(l)
	})
	return l
}

func (u *unit) waitState(id string, want broker.LeaseState) broker.Lease {
	u.t.Helper()
	return u.waitLease(id, "state "+want.String(), func(l broker.Lease) bool { return l.State == want })
}

func (u *unit) userExists(name string) bool {
	_, ok := u.db.User(name)
	return ok
}

// tick moves the clock n seconds, one maintenance tick at a time: before
// each second it waits (with a deadline) for the maintenance loop to have
// armed its next tick, so that no tick is skipped. No other timer of the
// broker may be due within the n seconds.
func (u *unit) tick(n int) {
	u.t.Helper()
	for range n {
		next := u.clock.Now().Add(time.Second)
		waitFor(u.t, "the maintenance loop to arm its next tick", func() bool { return u.clock.WaitersUntil(next) == 1 })
		u.clock.Advance(time.Second)
	}
}

// waitArmed waits (with a deadline) until a timer due exactly at due is
// armed on the clock: the dispatcher's for the earliest lease in its queue.
// Moving the clock before it is armed could let the dispatcher arm it
// relative to the moved clock, and wait too long.
func (u *unit) waitArmed(due time.Time) {
	u.t.Helper()
	waitFor(u.t, "a timer at "+due.String(), func() bool {
		return u.clock.WaitersUntil(due) > u.clock.WaitersUntil(due.Add(-time.Nanosecond))
	})
}

// nextEvent waits, with a deadline, for the subscriber's next event.
func nextEvent(t *testing.T, ch <-chan broker.Event) broker.Event {
	t.Helper()
	select {
	case ev := <-ch:
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no event within 10s")
		return broker.Event{}
	}
}

func TestUnitExpiryDropsTheUserAtExpireTime(t *testing.T) {
	u := newUnit(t)
	short, cs := u.issue(roleRO, time.Minute, "svc")
	long, cl := u.issue(roleRO, 10*time.Minute, "svc")
	events, unsubscribe := u.b.Subscribe(short.ID)
	defer unsubscribe()

	u.waitArmed(short.ExpireTime)
	u.clock.Advance(time.Minute - time.Nanosecond)
	if got := u.lease(short.ID).State; got != broker.StateActive {
		t.Fatalf("state 1ns before expiry = %s, want active", got)
	}
	u.clock.Advance(time.Nanosecond)
	l := u.waitState(short.ID, broker.StateExpired)
	if !l.EndTime.Equal(l.ExpireTime) {
		t.Errorf("ended at %v, want at its expire time %v (no lag under a manual clock)", l.EndTime, l.ExpireTime)
	}
	if u.userExists(cs.Username) {
		t.Error("the expired lease's user still exists")
	}
	if ev := nextEvent(t, events); ev.Type != broker.EventExpired || ev.Lease.ID != short.ID {
		t.Errorf("event = %v for %s, want EventExpired", ev.Type, ev.Lease.ID)
	}
	if got := u.lease(long.ID).State; got != broker.StateActive || !u.userExists(cl.Username) {
		t.Errorf("the 10m lease is %s after 1m (user exists: %v)", got, u.userExists(cl.Username))
	}
	if _, err := u.b.Renew(context.Background(), short.ID, 0); !errors.Is(err, broker.ErrLeaseExpired) {
		t.Errorf("renew of an expired lease: %v, want ErrLeaseExpired", err)
	}
}

func TestUnitExpiredWhileDownIsRevokedAtStart(t *testing.T) {
	u := newUnstarted(t)
	ctx := context.Background()
	l := broker.Lease{ID: strings.Repeat("a", 32), Role: roleRO, Target: "main", Username: "cb_read_only_gone",
		ProxyRole: "read_only_role", IssueTime: unitT0.Add(-time.Hour), ExpireTime: unitT0.Add(-time.Minute),
		MaxExpireTime: unitT0, State: broker.StateActive}
	if err := u.store.CreateLease(ctx, &l); err != nil {
		t.Fatal(err)
	}
	u.db.AddUser(fakedb.User{Name: l.Username})
	if err := u.b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	u.waitState(l.ID, broker.StateExpired)
	if u.userExists(l.Username) {
		t.Error("the user of a lease that expired while the broker was down still exists")
	}
}

func TestUnitRevocationBacksOffThenRevokeFailedThenRetriesLater(t *testing.T) {
	u := newUnit(t, func(c *broker.Config) { c.FailedRetryInterval = 10 * time.Minute })
	l, c := u.issue(roleRO, time.Minute, "svc")
	down := fmt.Errorf("%w: connection refused", broker.ErrUnavailable)
	u.db.FailUser(c.Username, down)

	u.waitArmed(l.ExpireTime)
	u.clock.Advance(time.Minute)
	got := u.waitLease(l.ID, "first failed attempt", func(l broker.Lease) bool { return l.RevokeAttempts >= 1 })
	if got.RevokeAttempts != 1 {
		t.Fatalf("%d attempts without moving the clock: retried without backoff", got.RevokeAttempts)
	}
	if got.State != broker.StateRevoking || !strings.Contains(got.LastError, "connection refused") {
		t.Errorf("after one failure: state %s, last_error %q", got.State, got.LastError)
	}
	// Exponential from 1s, full jitter over the upper half of each step.
	windows := map[int][2]time.Duration{1: {500 * time.Millisecond, time.Second}, 2: {time.Second, 2 * time.Second}}
	for attempt := 1; attempt <= 2; attempt++ {
		wait := got.NextAttempt.Sub(u.clock.Now())
		if w := windows[attempt]; wait < w[0] || wait > w[1] {
			t.Errorf("retry after attempt %d in %v, want within [%v, %v]", attempt, wait, w[0], w[1])
		}
		u.waitArmed(got.NextAttempt)
		u.clock.Advance(wait - time.Nanosecond)
		if n := u.lease(l.ID).RevokeAttempts; n != attempt {
			t.Fatalf("retried before its backoff: %d attempts", n)
		}
		u.clock.Advance(time.Nanosecond)
		got = u.waitLease(l.ID, fmt.Sprintf("attempt %d", attempt+1), func(l broker.Lease) bool { return l.RevokeAttempts >= attempt+1 })
		if got.RevokeAttempts != attempt+1 {
			t.Fatalf("%d attempts after one more backoff: retried without backoff", got.RevokeAttempts)
		}
	}
	if got.State != broker.StateRevokeFailed {
		t.Fatalf("after 3 failed attempts: state %s, want revoke_failed", got.State)
	}
	if want := u.clock.Now().Add(10 * time.Minute); !got.NextAttempt.Equal(want) {
		t.Errorf("revoke_failed retried at %v, want after FailedRetryInterval (%v)", got.NextAttempt, want)
	}
	if !u.userExists(c.Username) {
		t.Fatal("the user is gone although every drop failed")
	}
	failed, _, err := u.b.ListLeases(context.Background(), broker.LeaseFilter{State: broker.StateRevokeFailed})
	if err != nil || len(failed) != 1 || failed[0].ID != l.ID {
		t.Errorf("admins cannot list the failed lease: %v %v", failed, err)
	}

	u.db.FailUser(c.Username, nil) // PostgreSQL is back
	u.waitArmed(got.NextAttempt)
	u.clock.Advance(got.NextAttempt.Sub(u.clock.Now()))
	done := u.waitState(l.ID, broker.StateExpired)
	if done.LastError != "" || done.RevokeAttempts != 0 {
		t.Errorf("after the successful retry: last_error %q, attempts %d", done.LastError, done.RevokeAttempts)
	}
	if u.userExists(c.Username) {
		t.Error("the user exists after the successful retry")
	}
}

func TestUnitIssueTTL(t *testing.T) {
	u := newUnit(t)
	for _, tc := range []struct {
		name    string
		ttl     time.Duration
		want    time.Duration
		wantErr error
	}{
		{"zero is the default", 0, 15 * time.Minute, nil},
		{"within max", 30 * time.Minute, 30 * time.Minute, nil},
		{"above max is capped", 2 * time.Hour, time.Hour, nil},
		{"100000h is capped", 100000 * time.Hour, time.Hour, nil},
		{"one nanosecond", time.Nanosecond, time.Nanosecond, nil},
		{"negative", -time.Second, 0, broker.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(u.db.Usernames())
			l, c, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, TTL: tc.ttl})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if n := len(u.db.Usernames()); n != before {
					t.Errorf("a refused issue created a user")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := l.ExpireTime.Sub(l.IssueTime); got != tc.want {
				t.Errorf("granted %v, want %v", got, tc.want)
			}
			if got := l.MaxExpireTime.Sub(l.IssueTime); got != time.Hour {
				t.Errorf("max expire in %v, want the role's max TTL 1h", got)
			}
			user, ok := u.db.User(c.Username)
			if !ok || user.Password != c.Password || user.ProxyRole != "read_only_role" {
				t.Fatalf("the credential's user in the database: %+v (exists %v)", user, ok)
			}
			if want := l.ExpireTime.Add(time.Minute); !user.ValidUntil.Equal(want) {
				t.Errorf("VALID UNTIL %v, want expiry + 1m grace %v", user.ValidUntil, want)
			}
		})
	}
}

func TestUnitRenewTTL(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	l, c := u.issue(roleRO, 10*time.Minute, "svc")
	u.clock.Advance(5 * time.Minute)

	r, err := u.b.Renew(ctx, l.ID, 20*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if want := u.clock.Now().Add(20 * time.Minute); !r.ExpireTime.Equal(want) {
		t.Errorf("renew 20m: expire %v, want %v", r.ExpireTime, want)
	}
	if user, _ := u.db.User(c.Username); !user.ValidUntil.Equal(r.ExpireTime.Add(time.Minute)) {
		t.Errorf("VALID UNTIL %v did not move with the renewal to %v", user.ValidUntil, r.ExpireTime)
	}
	// Zero is the role's default (15m), and a renewal never shortens.
	r2, err := u.b.Renew(ctx, l.ID, 0)
	if err != nil || !r2.ExpireTime.Equal(r.ExpireTime) {
		t.Errorf("renew 0: expire %v (%v), want it kept at %v", r2.ExpireTime, err, r.ExpireTime)
	}
	u.clock.Advance(10 * time.Minute)
	r3, err := u.b.Renew(ctx, l.ID, 0)
	if want := u.clock.Now().Add(15 * time.Minute); err != nil || !r3.ExpireTime.Equal(want) {
		t.Errorf("renew 0 later: expire %v (%v), want the default TTL from now, %v", r3.ExpireTime, err, want)
	}
	// Never past the max.
	r4, err := u.b.Renew(ctx, l.ID, 100000*time.Hour)
	if err != nil || !r4.ExpireTime.Equal(l.MaxExpireTime) {
		t.Errorf("renew 100000h: expire %v (%v), want capped at %v", r4.ExpireTime, err, l.MaxExpireTime)
	}
	if _, err := u.b.Renew(ctx, l.ID, -time.Second); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Errorf("negative increment: %v, want ErrInvalidArgument", err)
	}
	if _, err := u.b.Renew(ctx, strings.Repeat("b", 32), 0); !errors.Is(err, broker.ErrLeaseNotFound) {
		t.Errorf("renew of an unknown lease: %v, want ErrLeaseNotFound", err)
	}
	if _, err := u.b.Revoke(ctx, l.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := u.b.Renew(ctx, l.ID, 0); !errors.Is(err, broker.ErrLeaseRevoked) {
		t.Errorf("renew of a revoked lease: %v, want ErrLeaseRevoked", err)
	}
}

func TestUnitRenewOfADroppedUserRevokesTheLease(t *testing.T) {
	u := newUnit(t)
	l, c := u.issue(roleRO, 10*time.Minute, "svc")
	u.db.DropUser(c.Username)
	if _, err := u.b.Renew(context.Background(), l.ID, 20*time.Minute); !errors.Is(err, broker.ErrLeaseRevoked) {
		t.Errorf("renew: %v, want ErrLeaseRevoked", err)
	}
	if s := u.lease(l.ID).State; s != broker.StateRevoked {
		t.Errorf("lease is %s, want revoked", s)
	}
}

func TestUnitRevokeSelector(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	var ro []broker.Lease
	for range 3 {
		l, _ := u.issue(roleRO, 0, "svc")
		ro = append(ro, l)
	}
	up, _ := u.issue(roleUpdater, 0, "svc")
	other, _ := u.issue(roleRO, 0, "other")

	if _, err := u.b.RevokeLeases(ctx, broker.RevokeSelector{}); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Fatalf("empty selector: %v, want ErrInvalidArgument", err)
	}
	if _, err := u.b.RevokeLeases(ctx, broker.RevokeSelector{IDs: []string{"not-an-id"}}); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Errorf("malformed id: %v, want ErrInvalidArgument", err)
	}
	if _, err := u.b.RevokeLeases(ctx, broker.RevokeSelector{IDs: []string{strings.Repeat("c", 32)}}); !errors.Is(err, broker.ErrLeaseNotFound) {
		t.Errorf("unknown id: %v, want ErrLeaseNotFound", err)
	}
	if n := len(u.db.Usernames()); n != 5 {
		t.Fatalf("refused selectors dropped users: %d left of 5", n)
	}

	// Role AND client.
	n, err := u.b.RevokeLeases(ctx, broker.RevokeSelector{Role: roleRO, Client: "svc"})
	if err != nil || n != 3 {
		t.Fatalf("role+client: revoked %d (%v), want 3", n, err)
	}
	for _, l := range ro {
		if s := u.lease(l.ID).State; s != broker.StateRevoked {
			t.Errorf("lease %s is %s, want revoked", l.ID, s)
		}
	}
	if s := u.lease(up.ID).State; s != broker.StateActive {
		t.Errorf("the other role's lease is %s", s)
	}
	if s := u.lease(other.ID).State; s != broker.StateActive {
		t.Errorf("the other client's lease is %s", s)
	}
	// IDs AND role: the updater lease does not match read_only.
	if n, err := u.b.RevokeLeases(ctx, broker.RevokeSelector{IDs: []string{up.ID}, Role: roleRO}); err != nil || n != 0 {
		t.Errorf("ids+role that do not match: revoked %d (%v), want 0", n, err)
	}
	// IDs: one already revoked, one named twice.
	if n, err := u.b.RevokeLeases(ctx, broker.RevokeSelector{IDs: []string{up.ID, ro[0].ID, up.ID}}); err != nil || n != 1 {
		t.Errorf("ids: revoked %d (%v), want 1", n, err)
	}
	// Client alone.
	if n, err := u.b.RevokeLeases(ctx, broker.RevokeSelector{Client: "other"}); err != nil || n != 1 {
		t.Errorf("client: revoked %d (%v), want 1", n, err)
	}
	if left := u.db.Usernames(); len(left) != 0 {
		t.Errorf("users left: %v", left)
	}
}

func TestUnitRevokeIsIdempotent(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	l, c := u.issue(roleRO, 0, "svc")
	r, err := u.b.Revoke(ctx, l.ID)
	if err != nil || r.State != broker.StateRevoked || !r.EndTime.Equal(u.clock.Now()) {
		t.Fatalf("revoke: %+v, %v", r, err)
	}
	if u.userExists(c.Username) {
		t.Error("the user exists after Revoke returned")
	}
	again, err := u.b.Revoke(ctx, l.ID)
	if err != nil || again.Revision != r.Revision || again.State != broker.StateRevoked {
		t.Errorf("second revoke changed the lease: %+v -> %+v (%v)", r, again, err)
	}
}

func TestUnitKeepAliveEvents(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	l, _ := u.issue(roleRO, 10*time.Minute, "svc")
	events, unsubscribe := u.b.Subscribe(l.ID)
	defer unsubscribe()

	if _, err := u.b.Renew(ctx, l.ID, 20*time.Minute); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, events); ev.Type != broker.EventRenewed {
		t.Errorf("after a renewal: event %v, want EventRenewed", ev.Type)
	}
	if _, err := u.b.Renew(ctx, l.ID, 2*time.Hour); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, events); ev.Type != broker.EventMaxTTLReached || !ev.Lease.ExpireTime.Equal(l.MaxExpireTime) {
		t.Errorf("after a renewal to the max: event %v expiring %v, want EventMaxTTLReached", ev.Type, ev.Lease.ExpireTime)
	}
	// At the cap, a renewal changes nothing and says so again.
	if _, err := u.b.Renew(ctx, l.ID, 0); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, events); ev.Type != broker.EventMaxTTLReached {
		t.Errorf("renewal at the cap: event %v, want EventMaxTTLReached", ev.Type)
	}
	if _, err := u.b.Revoke(ctx, l.ID); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, events); ev.Type != broker.EventRevoked || ev.Lease.State != broker.StateRevoked {
		t.Errorf("after revoke: event %v (%s), want EventRevoked", ev.Type, ev.Lease.State)
	}

	// Newest wins: a slow reader sees only the last of two events.
	l2, _ := u.issue(roleRO, 10*time.Minute, "svc")
	ev2, unsubscribe2 := u.b.Subscribe(l2.ID)
	defer unsubscribe2()
	if _, err := u.b.Renew(ctx, l2.ID, 20*time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := u.b.Revoke(ctx, l2.ID); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, ev2); ev.Type != broker.EventRevoked {
		t.Errorf("slow reader: event %v, want the newest, EventRevoked", ev.Type)
	}
	select {
	case ev := <-ev2:
		t.Errorf("a second, stale event was queued: %v", ev.Type)
	default:
	}

	// Not found: the domain answers ErrLeaseNotFound, which the KeepAlive
	// handler turns into KEEP_ALIVE_EVENT_NOT_FOUND.
	if _, err := u.b.Renew(ctx, strings.Repeat("d", 32), 0); !errors.Is(err, broker.ErrLeaseNotFound) {
		t.Errorf("renew of an unknown lease: %v, want ErrLeaseNotFound", err)
	}
}

func TestUnitRevokeOnDisconnect(t *testing.T) {
	u := newUnit(t, func(c *broker.Config) { c.DisconnectGrace = 30 * time.Second })
	ctx := context.Background()
	l, _, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc", RevokeOnDisconnect: true})
	if err != nil {
		t.Fatal(err)
	}
	u.b.WaitPromotions()
	u.b.StreamOpened(l.ID)
	u.tick(60) // long past the grace, but a stream names it
	if s := u.lease(l.ID).State; s != broker.StateActive {
		t.Fatalf("lease with an open stream is %s", s)
	}
	u.b.StreamClosed(l.ID)
	u.tick(29)
	if s := u.lease(l.ID).State; s != broker.StateActive {
		t.Fatalf("lease is %s within the grace", s)
	}
	u.tick(1)
	u.waitState(l.ID, broker.StateRevoked)
}

func TestUnitIssuePoolReservations(t *testing.T) {
	u := newUnit(t, func(c *broker.Config) { c.IssuePool = 4 })
	ctx := context.Background()
	// The first issue finds nothing ready, goes direct, and starts a refill.
	u.issue(roleRO, 0, "svc")
	var intents []broker.Intent
	waitFor(t, "4 reservations ready", func() bool {
		intents, _ = u.store.ListIntents(ctx)
		return len(intents) == 4
	})
	reserved := map[string]broker.Intent{}
	for _, in := range intents {
		reserved[in.LeaseID] = in
	}
	hashes := u.db.CallCount(fakedb.HashPassword)

	// The next issue takes one: its lease id and username were reserved,
	// its password hashed ahead, and its intent goes with the lease.
	l, c := u.issue(roleRO, 0, "svc")
	in, ok := reserved[l.ID]
	if !ok || in.Username != c.Username {
		t.Fatalf("lease %s (%s) was not one of the reservations %v", l.ID, c.Username, reserved)
	}
	user, _ := u.db.User(c.Username)
	if user.Verifier == "" || user.Password != c.Password {
		t.Errorf("the reserved user: %+v", user)
	}
	waitFor(t, "the pool to be topped up", func() bool {
		intents, _ = u.store.ListIntents(ctx)
		return len(intents) == 4 && !slices.ContainsFunc(intents, func(in broker.Intent) bool { return in.LeaseID == l.ID })
	})
	if n := u.db.CallCount(fakedb.HashPassword); n < hashes+1 {
		t.Errorf("the refill hashed no password ahead (%d hashes before, %d after)", hashes, n)
	}

	// Reconciliation leaves reservations alone: their users do not exist,
	// but the broker holds them.
	res, err := u.b.Reconcile(ctx)
	if err != nil || res.IntentsUnused != 0 || res.IntentsSettled != 0 {
		t.Errorf("reconcile touched reservations: %+v, %v", res, err)
	}
	// Close removes the intents of unused reservations.
	if err := u.b.Close(); err != nil {
		t.Fatal(err)
	}
	if intents, _ := u.store.ListIntents(ctx); len(intents) != 0 {
		t.Errorf("%d intents left after Close", len(intents))
	}
}

func TestUnitReconcile(t *testing.T) {
	u := newUnstarted(t)
	ctx := context.Background()
	id := func(c byte) string { return strings.Repeat(string(c), 32) }
	intent := func(lease, user string) broker.Intent {
		return broker.Intent{LeaseID: lease, Target: "main", Username: user, ProxyRole: "read_only_role", CreateTime: unitT0}
	}
	// A crash after CREATE ROLE: intent and user, no lease.
	u.db.AddUser(fakedb.User{Name: "cb_crashed"})
	mustPut(t, u.store, intent(id('a'), "cb_crashed"))
	// A crash before CREATE ROLE: intent, no user.
	mustPut(t, u.store, intent(id('b'), "cb_never_made"))
	// A crash after the lease was stored but with its intent left (a
	// store that lost the delete): the lease wins.
	leased := broker.Lease{ID: id('c'), Role: roleRO, Target: "main", Username: "cb_leased", ProxyRole: "read_only_role",
		IssueTime: unitT0, ExpireTime: unitT0.Add(time.Hour), MaxExpireTime: unitT0.Add(time.Hour), State: broker.StateActive}
	if err := u.store.CreateLease(ctx, &leased); err != nil {
		t.Fatal(err)
	}
	u.db.AddUser(fakedb.User{Name: "cb_leased"})
	mustPut(t, u.store, intent(id('c'), "cb_leased"))
	// A marker-role member nothing knows (a lost store file).
	u.db.AddUser(fakedb.User{Name: "cb_unknown"})

	res, err := u.b.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := broker.ReconcileResult{IntentsSettled: 1, IntentsCleared: 1, IntentsUnused: 1, UsersDropped: 1}
	if res != want {
		t.Errorf("reconcile = %+v, want %+v", res, want)
	}
	if got := u.db.Usernames(); !slices.Equal(got, []string{"cb_leased"}) {
		t.Errorf("users after reconcile: %v, want only the leased one", got)
	}
	if intents, _ := u.store.ListIntents(ctx); len(intents) != 0 {
		t.Errorf("intents left: %v", intents)
	}
	// Nothing left to do the second time.
	if res, err := u.b.Reconcile(ctx); err != nil || res != (broker.ReconcileResult{}) {
		t.Errorf("second reconcile: %+v, %v", res, err)
	}

	// A target that is down: reported, and nothing is dropped.
	u.db.AddUser(fakedb.User{Name: "cb_unknown2"})
	u.db.SetUnavailable(true)
	if _, err := u.b.Reconcile(ctx); !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("reconcile with the target down: %v, want ErrUnavailable", err)
	}
	u.db.SetUnavailable(false)
	if !u.userExists("cb_unknown2") {
		t.Error("a user was dropped while its target was down")
	}
}

func mustPut(t *testing.T, s broker.LeaseStore, in broker.Intent) {
	t.Helper()
	if err := s.PutIntent(context.Background(), in); err != nil {
		t.Fatal(err)
	}
}

func TestUnitIssueFailureLeavesNothing(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	u.db.FailNext(fakedb.NewUser, errors.New("injected"))
	if _, _, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleRO}); err == nil {
		t.Fatal("issue succeeded although CREATE ROLE failed")
	}
	if intents, _ := u.store.ListIntents(ctx); len(intents) != 0 {
		t.Errorf("intents left by a failed issue: %v", intents)
	}
	if got := u.db.CallCount(fakedb.DeleteUser); got != 1 {
		t.Errorf("the failed issue's user was dropped %d times, want once (the CREATE may have committed)", got)
	}
	if _, _, err := u.b.Issue(ctx, broker.IssueRequest{Role: "no_such_role"}); !errors.Is(err, broker.ErrRoleNotFound) {
		t.Errorf("unknown role: %v, want ErrRoleNotFound", err)
	}
}

func TestUnitTombstonesArePurgedAfterRetention(t *testing.T) {
	u := newUnit(t, func(c *broker.Config) { c.TombstoneRetention = time.Hour })
	ctx := context.Background()
	l, _ := u.issue(roleRO, 0, "svc")
	if _, err := u.b.Revoke(ctx, l.ID); err != nil {
		t.Fatal(err)
	}
	live, _ := u.issue(roleRO, 0, "svc")
	u.clock.Advance(59 * time.Minute)
	if n, err := u.b.PurgeTombstones(ctx); err != nil || n != 0 {
		t.Fatalf("purge within the retention: %d, %v", n, err)
	}
	u.clock.Advance(2 * time.Minute)
	if n, err := u.b.PurgeTombstones(ctx); err != nil || n != 1 {
		t.Fatalf("purge after the retention: %d, %v; want 1", n, err)
	}
	if _, err := u.b.Lookup(ctx, l.ID); !errors.Is(err, broker.ErrLeaseNotFound) {
		t.Errorf("purged lease: %v", err)
	}
	if _, err := u.b.Lookup(ctx, live.ID); err != nil {
		t.Errorf("a live lease was purged: %v", err)
	}
}

func TestUnitRevocationRecordFailureIsRetried(t *testing.T) {
	sw := &crashSwitch{}
	u := newUnit(t, func(c *broker.Config) { c.Store = faultStore{LeaseStore: c.Store, sw: sw} })
	ctx := context.Background()
	l, c := u.issue(roleRO, 0, "svc")
	sw.failNextCalls("UpdateLease:revoked", 1, errors.New("injected: disk full"))
	if _, err := u.b.Revoke(ctx, l.ID); err == nil {
		t.Fatal("Revoke succeeded although recording it failed")
	}
	if u.userExists(c.Username) {
		t.Error("the user survived; only the record of its drop failed")
	}
	if s := u.lease(l.ID).State; s != broker.StateRevoking {
		t.Fatalf("lease is %s, want still revoking (live, so it is tried again)", s)
	}
	// Retried after backoff(1), within a second, as an owner's revocation.
	next := u.clock.Now().Add(time.Second)
	waitFor(t, "the retry and the maintenance tick to be armed", func() bool { return u.clock.WaitersUntil(next) >= 2 })
	u.clock.Advance(time.Second)
	u.waitState(l.ID, broker.StateRevoked)
}

// Close may be called concurrently (a signal handler and a deferred
// Close): every call returns, and none panics on closing twice.
func TestUnitConcurrentCloseIsSafe(t *testing.T) {
	for range 20 {
		u := newUnit(t)
		start := make(chan struct{})
		var wg sync.WaitGroup
		panics := make(chan any, 16)
		for range 16 {
			wg.Go(func() {
				defer func() {
					if r := recover(); r != nil {
						panics <- r
					}
				}()
				<-start
				_ = u.b.Close()
			})
		}
		close(start)
		wg.Wait()
		close(panics)
		for r := range panics {
			t.Fatalf("concurrent Close panicked: %v", r)
		}
	}
}
