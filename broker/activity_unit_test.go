package broker_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
)

// fakeSessions is fakedb with sessions set by the test.
type fakeSessions struct {
	*fakedb.DB
	mu       sync.Mutex
	sessions []broker.Session
}

func (f *fakeSessions) set(s ...broker.Session) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sessions = s
}

func (f *fakeSessions) SampleSessions(context.Context) ([]broker.Session, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]broker.Session(nil), f.sessions...), nil
}

// TestUnitActivityAcrossInstances: two brokers on one store (a leadership
// change) never overwrite each other's newer usage with their own stale
// memory of it, and a session is counted once whichever samples it;
// sessions with a visible backend_start are told apart by it.
func TestUnitActivityAcrossInstances(t *testing.T) {
	ctx := context.Background()
	a := newUnstarted(t, func(c *broker.Config) { c.ActivityInterval = -1 })
	db := &fakeSessions{DB: a.db}
	clock := a.clock
	newBroker := func() *broker.Broker {
		b, err := broker.New(broker.Config{
			Store: a.store, Databases: map[string]broker.Database{"main": db}, Clock: clock, IssuePool: -1, ActivityInterval: -1,
			Roles: []broker.Role{{Name: roleRO, Target: "main", ProxyRole: "read_only_role", DefaultTTL: time.Hour, MaxTTL: time.Hour}},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = b.Close() })
		return b
	}
	first, second := newBroker(), newBroker()
	l, _, err := first.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	t0 := clock.Now()
	s1 := broker.Session{Username: l.Username, PID: 100, BackendStart: t0.Add(-time.Second), ApplicationName: "a"}
	s2 := broker.Session{Username: l.Username, PID: 100, BackendStart: t0.Add(time.Second), ApplicationName: "b"} // pid reused
	sample := func(b *broker.Broker) {
		t.Helper()
		if _, err := b.SampleActivity(ctx); err != nil {
			t.Fatal(err)
		}
	}
	usage := func() broker.LeaseUsage {
		t.Helper()
		got, err := a.store.GetLease(ctx, l.ID)
		if err != nil {
			t.Fatal(err)
		}
		return got.Usage
	}

	db.set(s1)
	sample(first) // first: seen 1
	clock.Advance(time.Minute)
	db.set(s1, s2)
	sample(second) // second (fresh memory): 2 open, 1 stored -> 1 new
	if u := usage(); u.SessionsSeen != 2 || u.Sessions != 2 || u.ApplicationName != "b" {
		t.Fatalf("after the second instance: %+v, want 2 seen, 2 open, newest b", u)
	}
	clock.Advance(time.Minute)
	db.set(s2)
	sample(first) // stale memory: must not write its own view
	if u := usage(); u.SessionsSeen != 2 || u.Sessions != 2 {
		t.Errorf("the stale instance overwrote the usage: %+v", u)
	}
	sample(first) // now from the stored usage
	if u := usage(); u.SessionsSeen != 2 || u.Sessions != 1 || u.PeakSessions != 2 || !u.LastSeen.Equal(clock.Now()) {
		t.Errorf("after the stale instance caught up: %+v, want 2 seen, 1 open, peak 2, last seen now", u)
	}
}
