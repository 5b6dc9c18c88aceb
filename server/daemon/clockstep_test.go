package daemon

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// steppedClock is a host's wall clock stepped by a settable amount. Like
// a real step (date -s, a bad NTP source) it moves the wall time only:
// timers, which wait on durations, are the real ones.
type steppedClock struct{ step atomic.Int64 }

func (c *steppedClock) Now() time.Time                         { return time.Now().Round(0).Add(time.Duration(c.step.Load())) }
func (c *steppedClock) After(d time.Duration) <-chan time.Time { return time.After(d) }
func (c *steppedClock) Step(d time.Duration)                   { c.step.Add(int64(d)) }

// TestGroupClockStepRevokesNothingEarly (issue 11): two brokerd in one
// group; once both run, the leader's host clock steps two minutes forward
// and the follower's two minutes back. Leases issued on either instance
// carry expire times on the database's clock (within a second of the
// real issue time plus the TTL), the leader expires the short ones no
// earlier than that and within the deadline, and the long ones stay
// active with their users in place.
func TestGroupClockStepRevokesNothingEarly(t *testing.T) {
	const ttl = 2 * time.Second
	const step = 2 * time.Minute
	cluster := etcdtest.StartCluster(t, 1)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	eps := cluster.Endpoints()

	hostA, hostB := &steppedClock{}, &steppedClock{}
	optsA, optsB := testOptions(), testOptions()
	optsA.HostClock, optsB.HostClock = hostA, hostB
	a, err := Start(ctx, etcdConfig(t, tg, eps, "/group/", "broker-a", ttl, "", ""), optsA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	eventsA := watchLifecycle(a.Broker())
	waitUntil(t, "A to lead", 30*time.Second, func() bool { return leading(a) })
	b, err := Start(ctx, etcdConfig(t, tg, eps, "/group/", "broker-b", ttl, "", ""), optsB)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	eventsB := watchLifecycle(b.Broker())

	hostA.Step(step)
	hostB.Step(-step)

	type issued struct {
		lease broker.Lease
		at    time.Time // the real time just before the call
		ttl   time.Duration
	}
	issue := func(d *Daemon, ttl time.Duration) issued {
		t.Helper()
		at := time.Now()
		l, _, err := d.Broker().Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "svc", TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		return issued{lease: l, at: at, ttl: ttl}
	}
	shortA, shortB := issue(a, 3*time.Second), issue(b, 3*time.Second)
	longA, longB := issue(a, time.Minute), issue(b, time.Minute)
	for name, is := range map[string]issued{"shortA": shortA, "shortB": shortB, "longA": longA, "longB": longB} {
		want := is.at.Add(is.ttl)
		if d := is.lease.ExpireTime.Sub(want); d < -time.Second || d > 2*time.Second {
			t.Errorf("%s expires at %s, %s from the real issue time plus its TTL (%s)", name, is.lease.ExpireTime, d, want)
		}
	}

	// The leader ends the short leases, not before they are due.
	ended := map[string]time.Time{}
	waitUntil(t, "the leader to expire the short leases", 30*time.Second, func() bool {
		for _, ev := range eventsA.ended(time.Time{}) {
			if _, seen := ended[ev.LeaseID]; !seen {
				ended[ev.LeaseID] = time.Now()
			}
		}
		return len(ended) >= 2
	})
	for _, is := range []issued{shortA, shortB} {
		at, ok := ended[is.lease.ID]
		if !ok {
			t.Errorf("lease %s (short) was not expired; ended: %v", is.lease.ID, ended)
			continue
		}
		if due := is.at.Add(is.ttl - time.Second); at.Before(due) {
			t.Errorf("lease %s ended at %s, before it was due (%s)", is.lease.ID, at.Format(time.StampMilli), due.Format(time.StampMilli))
		}
	}
	if got := eventsB.ended(time.Time{}); len(got) != 0 {
		t.Errorf("the follower ended leases: %+v", got)
	}

	// The long leases are untouched: active, their users able to log in
	// until the database's clock reaches the expire time.
	conn, err := pgx.Connect(ctx, tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	for _, is := range []issued{longA, longB} {
		l, err := a.store.GetLease(ctx, is.lease.ID)
		if err != nil || l.State != broker.StateActive {
			t.Errorf("lease %s: state %s, err %v; want active", is.lease.ID, l.State, err)
		}
		var validUntil time.Time
		var canLogin bool
		if err := conn.QueryRow(ctx, `SELECT rolcanlogin, rolvaliduntil FROM pg_roles WHERE rolname = $1`, is.lease.Username).Scan(&canLogin, &validUntil); err != nil {
			t.Errorf("user of lease %s: %v", is.lease.ID, err)
			continue
		}
		if !canLogin || validUntil.Before(is.at.Add(is.ttl)) {
			t.Errorf("user of lease %s: login %t, valid until %s; want a login valid until at least %s", is.lease.ID, canLogin, validUntil, is.at.Add(is.ttl))
		}
	}
	for _, ev := range eventsA.ended(time.Time{}) {
		if ev.LeaseID == longA.lease.ID || ev.LeaseID == longB.lease.ID {
			t.Errorf("a long lease ended: %+v", ev)
		}
	}
}
