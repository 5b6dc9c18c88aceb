package broker_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// gatedRenewals wraps a Database: it records the size of every RenewUsers
// call and holds the first one until released.
type gatedRenewals struct {
	broker.Database
	mu      sync.Mutex
	sizes   []int
	entered chan struct{} // closed when the first call arrives
	gate    chan struct{} // the first call waits for it
}

func (g *gatedRenewals) RenewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	g.mu.Lock()
	g.sizes = append(g.sizes, len(reqs))
	first := len(g.sizes) == 1
	g.mu.Unlock()
	if first {
		close(g.entered)
		<-g.gate
	}
	return g.Database.RenewUsers(ctx, reqs)
}

func (g *gatedRenewals) batchSizes() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.sizes)
}

// newLingerUnit is a unit broker whose renewals go through a
// gatedRenewals, with the linger's timer in the test's hands: it expires
// only when the returned function is called.
func newLingerUnit(t *testing.T) (*unit, *gatedRenewals, func()) {
	t.Helper()
	g := &gatedRenewals{entered: make(chan struct{}), gate: make(chan struct{})}
	u := newUnit(t, func(c *broker.Config) {
		g.Database = c.Databases["main"]
		c.Databases["main"] = g
		c.RenewBatches = 1
	})
	expire := make(chan time.Time)
	u.b.SetRenewLingerTimer(func(time.Duration) <-chan time.Time { return expire })
	var once sync.Once
	return u, g, func() { once.Do(func() { close(expire) }) }
}

// renewAsync renews id in a goroutine; the result arrives on the channel.
func renewAsync(b *broker.Broker, id string) <-chan error {
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := b.Renew(ctx, id, 20*time.Minute)
		done <- err
	}()
	return done
}

func mustDone(t *testing.T, what string, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no answer", what)
	}
}

// TestUnitRenewalLingerFillsTheNextBatch: after a batch of two, the batch
// goroutine waits for two renewals again instead of committing the first
// that arrives alone. The linger's timer never expires here, so without
// the linger the lone renewal would be a batch of its own.
func TestUnitRenewalLingerFillsTheNextBatch(t *testing.T) {
	u, g, _ := newLingerUnit(t)
	var ids []string
	for range 5 {
		l, _ := u.issue(roleRO, 0, "c")
		ids = append(ids, l.ID)
	}
	u.clock.Advance(time.Minute)

	first := renewAsync(u.b, ids[0])
	<-g.entered // a batch of one, held in PostgreSQL
	second, third := renewAsync(u.b, ids[1]), renewAsync(u.b, ids[2])
	waitFor(t, "two renewals queued behind the held batch", func() bool { return u.b.PendingRenewals() == 2 })
	close(g.gate)
	mustDone(t, "first", first)
	mustDone(t, "second", second)
	mustDone(t, "third", third)

	// The batch of two is committed; one renewal arrives alone and must
	// wait for a second.
	fourth := renewAsync(u.b, ids[3])
	waitFor(t, "the fourth renewal pending", func() bool { return u.b.PendingRenewals() == 1 })
	fifth := renewAsync(u.b, ids[4])
	mustDone(t, "fourth", fourth)
	mustDone(t, "fifth", fifth)

	if got, want := g.batchSizes(), []int{1, 2, 2}; !slices.Equal(got, want) {
		t.Errorf("RenewUsers batch sizes %v, want %v", got, want)
	}
}

// TestUnitRenewalLingerIsBounded: a renewal left waiting by the linger is
// committed alone once the bound passes.
func TestUnitRenewalLingerIsBounded(t *testing.T) {
	u, g, expire := newLingerUnit(t)
	var ids []string
	for range 4 {
		l, _ := u.issue(roleRO, 0, "c")
		ids = append(ids, l.ID)
	}
	u.clock.Advance(time.Minute)
	first := renewAsync(u.b, ids[0])
	<-g.entered
	second, third := renewAsync(u.b, ids[1]), renewAsync(u.b, ids[2])
	waitFor(t, "two renewals queued behind the held batch", func() bool { return u.b.PendingRenewals() == 2 })
	close(g.gate)
	for _, d := range []<-chan error{first, second, third} {
		mustDone(t, "renewal", d)
	}

	fourth := renewAsync(u.b, ids[3])
	waitFor(t, "the fourth renewal pending", func() bool { return u.b.PendingRenewals() == 1 })
	expire()
	mustDone(t, "fourth, after the linger's bound", fourth)
	if got, want := g.batchSizes(), []int{1, 2, 1}; !slices.Equal(got, want) {
		t.Errorf("RenewUsers batch sizes %v, want %v", got, want)
	}
}

// TestUnitLoneRenewalDoesNotLinger: on an idle broker, and after a batch
// of one, a renewal is committed at once; the linger's timer never
// expires here, so any wait would hang the renewal.
func TestUnitLoneRenewalDoesNotLinger(t *testing.T) {
	u, g, _ := newLingerUnit(t)
	close(g.gate)
	l, _ := u.issue(roleRO, 0, "c")
	u.clock.Advance(time.Minute)
	for i := range 3 {
		mustDone(t, "lone renewal", renewAsync(u.b, l.ID))
		u.clock.Advance(time.Minute)
		if got := len(g.batchSizes()); got != i+1 {
			t.Fatalf("after %d lone renewals, %d RenewUsers calls", i+1, got)
		}
	}
}
