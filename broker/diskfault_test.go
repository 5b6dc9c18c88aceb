package broker_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/tmpfs"
)

// diskFullStore counts the writes of revocations the disk refused.
type diskFullStore struct {
	broker.LeaseStore
	refused *atomic.Int64
}

func (s diskFullStore) count(err error) {
	if errors.Is(err, syscall.ENOSPC) {
		s.refused.Add(1)
	}
}

func (s diskFullStore) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	out, err := s.LeaseStore.UpdateLease(ctx, l)
	s.count(err)
	return out, err
}

func (s diskFullStore) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	out, errs := s.LeaseStore.UpdateLeases(ctx, ls)
	for _, err := range errs {
		s.count(err)
	}
	return out, errs
}

// Point 2 of issue 10: while the store's disk is full, an issue answers
// ErrUnavailable (gRPC Unavailable, server/errors.go) and hands out
// nothing, and the revocations that fall due are retried; within seconds
// of the space coming back every due lease is revoked, by the same broker
// and store handle, without a restart. Real bbolt on a real full tmpfs,
// real PostgreSQL.
func TestDiskFullLosesNothing(t *testing.T) {
	fs := tmpfs.Mount(t, 2<<20)
	refused := &atomic.Int64{}
	e := newEnvAt(t, filepath.Join(fs.Dir, "leases.db"), func(c *broker.Config) {
		c.Store = diskFullStore{LeaseStore: c.Store, refused: refused}
	})
	ctx := context.Background()
	// Large records, so that a burst of state changes needs new pages.
	pad := map[string]string{"a": strings.Repeat("a", 500), "b": strings.Repeat("b", 500), "c": strings.Repeat("c", 500)}
	issue := func() (broker.Lease, broker.Credential, error) {
		return e.b.Issue(ctx, broker.IssueRequest{Role: roleRO, TTL: time.Minute, Client: "test", Metadata: pad})
	}
	var leases []broker.Lease
	for range 40 {
		l, _, err := issue()
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l)
	}

	fs.Fill(t)
	var refusedIssues int
	for i := 0; refusedIssues < 3; i++ {
		if i == 200 {
			t.Fatalf("200 issues on a full disk, %d refused: bbolt never needed a new page?", refusedIssues)
		}
		l, c, err := issue()
		if err == nil {
			leases = append(leases, l) // a free page of the file took it
			continue
		}
		refusedIssues++
		if !errors.Is(err, broker.ErrUnavailable) {
			t.Errorf("issue on a full disk: %v; want ErrUnavailable", err)
		}
		if c != (broker.Credential{}) || l.ID != "" {
			t.Errorf("a refused issue handed out lease %q, user %q", l.ID, c.Username)
		}
	}
	e.assertNoOrphans() // no user of a refused issue is left

	// The burst falls due while the disk is still full, and its retries too.
	e.clock.Advance(time.Minute)
	waitFor(t, "the disk to refuse a revocation's write", func() bool { return refused.Load() > 0 })
	for range 2 {
		n := refused.Load()
		runQueue(t, e.b, e.clock, 100, "a retry refused again", func() bool { return refused.Load() > n })
	}
	live := 0
	for _, l := range leases {
		if e.lease(l.ID).State.Live() {
			live++
		}
	}
	if live == 0 {
		t.Fatal("every lease expired although the disk was full: the test staged nothing")
	}
	t.Logf("%d leases, %d issues refused, %d revocation writes refused, %d leases live when the space came back", len(leases), refusedIssues, refused.Load(), live)

	fs.Free(t)
	freed := e.clock.Now()
	// Each lease retries at its own jittered time: one queue entry each.
	runQueue(t, e.b, e.clock, 4*len(leases), "every lease expired", func() bool {
		for _, l := range leases {
			if e.lease(l.ID).State != broker.StateExpired {
				return false
			}
		}
		return true
	})
	if took := e.clock.Now().Sub(freed); took > 8*time.Second {
		t.Errorf("the revocations took %v after the disk recovered, want within RetryMaxDelay (8s)", took)
	}
	for _, l := range leases {
		got := e.lease(l.ID)
		if got.EndTime.Before(got.ExpireTime) {
			t.Errorf("lease %s ended at %v, before its expire time %v", l.ID, got.EndTime, got.ExpireTime)
		}
		if e.roleExists(l.Username) {
			t.Errorf("user %s survived its lease", l.Username)
		}
	}
	l, _, err := issue()
	if err != nil {
		t.Fatalf("issue after the disk recovered: %v", err)
	}
	if _, err := e.b.Revoke(ctx, l.ID); err != nil {
		t.Fatal(err)
	}
	// What the refused issues left (their intents) the reconciler settles;
	// the issue pool's reservations go when the broker closes.
	e.reconcileCloseAndCheckIntents(t, "")
	if users, err := e.engine.ListManagedUsers(ctx); err != nil || len(users) != 0 {
		t.Errorf("users left: %v (%v)", users, err)
	}
}
