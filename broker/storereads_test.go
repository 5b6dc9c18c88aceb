package broker_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store/memstore"
)

// staleHints is a store whose hints (broker.LeaseHinter) are the leases as
// they were at the last freeze: what an etcd store's cache answers when
// another instance changed a lease.
type staleHints struct {
	broker.LeaseStore
	mu     sync.Mutex
	frozen map[string]broker.Lease
}

func (s *staleHints) freeze(t *testing.T, ids ...string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.frozen = map[string]broker.Lease{}
	for _, id := range ids {
		l, err := s.GetLease(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		s.frozen[id] = l
	}
}

func (s *staleHints) LeaseHint(ctx context.Context, id string) (broker.Lease, error) {
	s.mu.Lock()
	l, ok := s.frozen[id]
	s.mu.Unlock()
	if !ok {
		return s.GetLease(ctx, id)
	}
	return l.Clone(), nil
}

func (s *staleHints) LeaseHints(ctx context.Context, ids []string) ([]broker.Lease, []error) {
	out := make([]broker.Lease, len(ids))
	errs := make([]error, len(ids))
	for i, id := range ids {
		out[i], errs[i] = s.LeaseHint(ctx, id)
	}
	return out, errs
}

// A renewal batch that reads stale hints never answers from them: a lease
// revoked since the hint is refused whether the renewal would extend it
// (the write's compare-and-set loses) or not (nothing to write: the
// single path reads it afresh), and a lease renewed since is renewed.
func TestUnitRenewFromStaleHints(t *testing.T) {
	st := &staleHints{LeaseStore: memstore.New()}
	u := newUnit(t, func(c *broker.Config) { c.Store = st })
	ctx := context.Background()
	revoked, _ := u.issue(roleRO, 10*time.Minute, "svc")
	renewed, _ := u.issue(roleRO, 10*time.Minute, "svc")
	st.freeze(t, revoked.ID, renewed.ID)
	if _, err := u.b.Revoke(ctx, revoked.ID); err != nil {
		t.Fatal(err)
	}
	for _, inc := range []time.Duration{time.Minute, 30 * time.Minute} {
		if l, err := u.b.Renew(ctx, revoked.ID, inc); !errors.Is(err, broker.ErrLeaseRevoked) {
			t.Errorf("renew by %v of a lease revoked after its hint: %+v, %v; want ErrLeaseRevoked", inc, l, err)
		}
	}

	u.clock.Advance(time.Minute)
	first, err := u.b.Renew(ctx, renewed.ID, 20*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	u.clock.Advance(time.Minute)
	second, err := u.b.Renew(ctx, renewed.ID, 20*time.Minute) // its hint predates first
	if want := u.clock.Now().Add(20 * time.Minute); err != nil || !second.ExpireTime.Equal(want) || second.Revision <= first.Revision {
		t.Errorf("renew of a lease renewed after its hint: expire %v revision %d (%v), want %v and a revision above %d",
			second.ExpireTime, second.Revision, err, want, first.Revision)
	}
}
