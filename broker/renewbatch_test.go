package broker_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
)

// batchSpy wraps the real engine and store: it records the size of every
// RenewUsers and UpdateLeases call, and can hold the first RenewUsers
// until released, so that renewals pile up behind it.
type batchSpy struct {
	mu         sync.Mutex
	dbBatches  []int
	stBatches  []int
	gate       chan struct{} // nil: no holding
	entered    chan struct{}
	enteredOne sync.Once
}

type spyDB struct {
	broker.Database
	spy *batchSpy
}

func (d spyDB) RenewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	s := d.spy
	s.mu.Lock()
	s.dbBatches = append(s.dbBatches, len(reqs))
	first := len(s.dbBatches) == 1
	s.mu.Unlock()
	if first && s.gate != nil {
		s.enteredOne.Do(func() { close(s.entered) })
		<-s.gate
	}
	return d.Database.RenewUsers(ctx, reqs)
}

type spyStore struct {
	broker.LeaseStore
	spy *batchSpy
}

func (st spyStore) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	st.spy.mu.Lock()
	st.spy.stBatches = append(st.spy.stBatches, len(ls))
	st.spy.mu.Unlock()
	return st.LeaseStore.UpdateLeases(ctx, ls)
}

func (s *batchSpy) sizes() (db, st []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.dbBatches...), append([]int(nil), s.stBatches...)
}

// TestRenewalsArrivingTogetherAreCommittedTogether holds one renewal in
// PostgreSQL while others arrive, and checks that those others are then
// committed by one RenewUsers and one UpdateLeases call, each with a
// result of its own: a lease whose user was dropped by hand fails alone
// (its lease ends), the rest are renewed.
func TestRenewalsArrivingTogetherAreCommittedTogether(t *testing.T) {
	spy := &batchSpy{gate: make(chan struct{}), entered: make(chan struct{})}
	e := newEnv(t, func(c *broker.Config) {
		c.Databases["main"] = spyDB{Database: c.Databases["main"], spy: spy}
		c.Store = spyStore{LeaseStore: c.Store, spy: spy}
		c.RenewBatches = 1 // so that everything queues behind the held batch
	})
	const n = 12
	first, _ := e.issue(roleRO, 0)
	var leases []broker.Lease
	var dropped broker.Credential
	for i := range n {
		l, c := e.issue(roleRO, 0)
		leases = append(leases, l)
		if i == 3 {
			dropped = c
		}
	}
	spy.mu.Lock()
	spy.stBatches = nil // the issues' promotions to ACTIVE (promote.go), written by e.issue's end
	spy.mu.Unlock()
	conn, err := pgx.Connect(context.Background(), e.target.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), "DROP ROLE "+pgx.Identifier{dropped.Username}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	events, unsubscribe := e.b.Subscribe(leases[0].ID)
	defer unsubscribe()

	e.clock.Advance(time.Minute)
	firstDone := make(chan error, 1)
	go func() {
		_, err := e.b.Renew(context.Background(), first.ID, 20*time.Minute)
		firstDone <- err
	}()
	select {
	case <-spy.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first renewal never reached PostgreSQL")
	}

	results := make([]broker.Lease, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range leases {
		wg.Go(func() { results[i], errs[i] = e.b.Renew(context.Background(), leases[i].ID, 20*time.Minute) })
	}
	waitFor(t, "the renewals to queue behind the first", func() bool { return e.b.PendingRenewals() == n })
	close(spy.gate)
	wg.Wait()
	if err := <-firstDone; err != nil {
		t.Fatalf("first renewal: %v", err)
	}

	want := e.clock.Now().Add(20 * time.Minute)
	for i := range leases {
		if i == 3 {
			if !errors.Is(errs[i], broker.ErrLeaseRevoked) {
				t.Errorf("renewal of the dropped user: %v, want ErrLeaseRevoked", errs[i])
			}
			if s := e.lease(leases[i].ID).State; s != broker.StateRevoked {
				t.Errorf("the dropped user's lease is %s, want revoked", s)
			}
			continue
		}
		if errs[i] != nil {
			t.Errorf("renewal %d: %v", i, errs[i])
			continue
		}
		if !results[i].ExpireTime.Equal(want) {
			t.Errorf("renewal %d: expire %v, want %v", i, results[i].ExpireTime, want)
		}
		if got := e.lease(leases[i].ID); !got.ExpireTime.Equal(want) || got.Revision != results[i].Revision {
			t.Errorf("stored lease %d: expire %v rev %d, want %v rev %d", i, got.ExpireTime, got.Revision, want, results[i].Revision)
		}
	}
	if got := e.validUntil(results[5].Username); got.Before(want) {
		t.Errorf("VALID UNTIL of a renewed user %v, before its expiry %v", got, want)
	}
	select {
	case ev := <-events:
		if ev.Type != broker.EventRenewed || !ev.Lease.ExpireTime.Equal(want) {
			t.Errorf("event %v for %v, want renewed to %v", ev.Type, ev.Lease.ExpireTime, want)
		}
	default:
		t.Error("no renewal event was published")
	}

	db, st := spy.sizes()
	// The first renewal alone, then the n that queued behind it in one
	// batch (PostgreSQL and the store at once, so the store takes the
	// dropped user's lease too); the dropped user is then retried alone
	// and fails.
	if len(db) < 2 || db[0] != 1 || db[1] != n {
		t.Errorf("RenewUsers batch sizes %v, want [1 %d ...]", db, n)
	}
	if len(st) < 2 || st[0] != 1 || st[1] != n {
		t.Errorf("UpdateLeases batch sizes %v, want [1 %d ...]", st, n)
	}
}

// TestRenewalBatchesOverlap holds one renewal batch in PostgreSQL and
// checks that, with two batches allowed per target, renewals arriving
// meanwhile are committed by a second batch without waiting for the
// first; then the first completes too.
func TestRenewalBatchesOverlap(t *testing.T) {
	spy := &batchSpy{gate: make(chan struct{}), entered: make(chan struct{})}
	e := newEnv(t, func(c *broker.Config) {
		c.Databases["main"] = spyDB{Database: c.Databases["main"], spy: spy}
		c.Store = spyStore{LeaseStore: c.Store, spy: spy}
		c.RenewBatches = 2
	})
	held, _ := e.issue(roleRO, 0)
	other, _ := e.issue(roleRO, 0)
	e.clock.Advance(time.Minute)
	heldDone := make(chan error, 1)
	go func() {
		_, err := e.b.Renew(context.Background(), held.ID, 20*time.Minute)
		heldDone <- err
	}()
	select {
	case <-spy.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first renewal never reached PostgreSQL")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	l, err := e.b.Renew(ctx, other.ID, 20*time.Minute)
	cancel()
	if err != nil {
		close(spy.gate)
		<-heldDone
		t.Fatalf("renewal beside a held batch: %v", err)
	}
	want := e.clock.Now().Add(20 * time.Minute)
	if !l.ExpireTime.Equal(want) {
		t.Errorf("renewed to %v, want %v", l.ExpireTime, want)
	}
	select {
	case err := <-heldDone:
		t.Fatalf("the held renewal finished before its batch was released: %v", err)
	default:
	}
	close(spy.gate)
	if err := <-heldDone; err != nil {
		t.Fatalf("held renewal: %v", err)
	}
	if got := e.lease(held.ID); !got.ExpireTime.Equal(want) {
		t.Errorf("held lease expires %v, want %v", got.ExpireTime, want)
	}
}

// TestRenewToMaxTTLPublishesMaxTTLReached: the renewal that reaches the
// cap is published as MAX_TTL_REACHED, so streams push it at once.
func TestRenewToMaxTTLPublishesMaxTTLReached(t *testing.T) {
	e := newEnv(t)
	l, _ := e.issue(roleRO, 50*time.Minute)
	events, unsubscribe := e.b.Subscribe(l.ID)
	defer unsubscribe()
	e.clock.Advance(45 * time.Minute)
	got, err := e.b.Renew(context.Background(), l.ID, 30*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if !got.ExpireTime.Equal(got.MaxExpireTime) {
		t.Fatalf("expire %v, want the max %v", got.ExpireTime, got.MaxExpireTime)
	}
	select {
	case ev := <-events:
		if ev.Type != broker.EventMaxTTLReached {
			t.Errorf("event %v, want MaxTTLReached", ev.Type)
		}
	default:
		t.Error("no event published")
	}
}
