package broker_test

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
)

// holdUpdates holds every UpdateLeases call (a renewal batch's store
// commit, on the batch goroutine) until gate closes; entered closes when
// the first one arrives.
type holdUpdates struct {
	broker.LeaseStore
	entered, gate chan struct{}
	once          *sync.Once
}

func (s holdUpdates) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	s.once.Do(func() { close(s.entered) })
	<-s.gate
	return s.LeaseStore.UpdateLeases(ctx, ls)
}

// inStack reports whether a goroutine's stack holds both fragments.
func inStack(a, b string) bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, a) && strings.Contains(g, b) {
			return true
		}
	}
	return false
}

// TestUnitCloseWaitsForBatchGoroutines: Close returns only after a
// renewal batch's goroutine that is in flight has ended (its store commit
// done), not while it still uses the store. The broker is not started,
// so the batch goroutine is the only one Close can wait for.
func TestUnitCloseWaitsForBatchGoroutines(t *testing.T) {
	st := holdUpdates{entered: make(chan struct{}), gate: make(chan struct{}), once: &sync.Once{}}
	u := newUnstarted(t, func(c *broker.Config) {
		st.LeaseStore = c.Store
		c.Store = st
	})
	now := u.clock.Now()
	l := broker.Lease{ID: strings.Repeat("c", 32), Role: roleRO, Client: "svc", Target: "main", Username: "cb_read_only_cccccccccccc",
		ProxyRole: "read_only_role", IssueTime: now, ExpireTime: now.Add(15 * time.Minute),
		MaxExpireTime: now.Add(time.Hour), State: broker.StateActive}
	if err := u.store.CreateLease(context.Background(), &l); err != nil {
		t.Fatal(err)
	}
	u.db.AddUser(fakedb.User{Name: l.Username, ProxyRole: l.ProxyRole, ValidUntil: l.ExpireTime})

	type result struct {
		lease broker.Lease
		err   error
	}
	renewed := make(chan result, 1)
	go func() {
		got, err := u.b.Renew(context.Background(), l.ID, 30*time.Minute)
		renewed <- result{got, err}
	}()
	select {
	case <-st.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the renewal's batch never reached the store")
	}

	closed := make(chan error, 1)
	go func() { closed <- u.b.Close() }()
	deadline := time.Now().Add(10 * time.Second)
	// Close is waiting once it is parked in the broker's WaitGroup.
	for !inStack("broker.(*Broker).Close(", "sync.(*WaitGroup).Wait(") {
		select {
		case <-closed:
			close(st.gate)
			t.Fatal("Close returned while a renewal batch was in flight")
		default:
		}
		if time.Now().After(deadline) {
			close(st.gate)
			t.Fatal("timed out waiting for Close to wait or return")
		}
		runtime.Gosched()
	}
	close(st.gate)
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return once the batch could end")
	}
	// Close returned after the batch goroutine ended: its commit is done
	// and no goroutine runs the batch any more.
	if inStack("broker.(*Broker).renewBatch(", "") {
		t.Error("Close returned while a goroutine still runs the renewal batch")
	}
	if got, err := u.store.GetLease(context.Background(), l.ID); err != nil || !got.ExpireTime.Equal(now.Add(30*time.Minute)) {
		t.Errorf("stored lease after Close: expire %v (%v); want the batch's renewal to %v committed", got.ExpireTime, err, now.Add(30*time.Minute))
	}
	select {
	case r := <-renewed:
		if r.err != nil || !r.lease.ExpireTime.Equal(now.Add(30*time.Minute)) {
			t.Errorf("renewal: %v, expire %v; want renewed to %v", r.err, r.lease.ExpireTime, now.Add(30*time.Minute))
		}
	case <-time.After(10 * time.Second):
		t.Error("the renewal was never answered")
	}
}
