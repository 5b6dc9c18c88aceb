package broker_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/credbroker/credbroker/broker"
)

// TestUnitReconcileEndsLeasesWhoseUserIsGone: a live lease whose user was
// dropped behind the broker's back (or a store restored from an older
// backup) is ended REVOKED by the next reconciliation, audited with
// reason reconcile, once; a lease whose user exists is left alone.
func TestUnitReconcileEndsLeasesWhoseUserIsGone(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	var reasons []string
	stop := u.b.WatchLifecycle(func(ev broker.AuditEvent) {
		if ev.Action == broker.AuditRevoke {
			reasons = append(reasons, ev.Reason)
		}
	})
	defer stop()
	gone, _ := u.issue(roleRO, 0, "svc")
	kept, _ := u.issue(roleRO, 0, "svc")
	if err := u.db.DeleteUser(ctx, broker.DeleteUserRequest{Username: gone.Username}); err != nil {
		t.Fatal(err)
	}
	res, err := u.b.Reconcile(ctx)
	if err != nil || res.LeasesSettled != 1 {
		t.Fatalf("Reconcile = %+v, %v; want one lease settled", res, err)
	}
	if l := u.lease(gone.ID); l.State != broker.StateRevoked || l.LastError != "" {
		t.Errorf("lease whose user was gone: %v %q, want revoked without error", l.State, l.LastError)
	}
	if l := u.lease(kept.ID); l.State != broker.StateActive {
		t.Errorf("lease whose user exists: %v, want active", l.State)
	}
	if len(reasons) != 1 || reasons[0] != broker.ReasonReconcile {
		t.Errorf("revoke reasons = %q, want [reconcile]", reasons)
	}
	if res, err := u.b.Reconcile(ctx); err != nil || res.LeasesSettled != 0 {
		t.Errorf("second Reconcile = %+v, %v; want nothing settled", res, err)
	}
}

// writeCounter counts a store's lease writes (one per UpdateLease or
// UpdateLeases call).
type writeCounter struct {
	broker.LeaseStore
	writes atomic.Int32
}

func (w *writeCounter) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	w.writes.Add(1)
	return w.LeaseStore.UpdateLease(ctx, l)
}

func (w *writeCounter) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	w.writes.Add(1)
	return w.LeaseStore.UpdateLeases(ctx, ls)
}

// Leases whose users are gone are ended in batches, as expiries are: a
// store restored from an older backup can hold thousands, and two store
// commits each held a sole broker's start-up for minutes.
func TestUnitReconcileEndsGoneLeasesInBatches(t *testing.T) {
	var wc *writeCounter
	u := newUnit(t, func(c *broker.Config) {
		wc = &writeCounter{LeaseStore: c.Store}
		c.Store = wc
	})
	ctx := context.Background()
	const n = 100
	var ids []string
	for range n {
		l, _ := u.issue(roleRO, 0, "svc")
		ids = append(ids, l.ID)
		if err := u.db.DeleteUser(ctx, broker.DeleteUserRequest{Username: l.Username}); err != nil {
			t.Fatal(err)
		}
	}
	wc.writes.Store(0)
	res, err := u.b.Reconcile(ctx)
	if err != nil || res.LeasesSettled != n {
		t.Fatalf("Reconcile = %+v, %v; want %d leases settled", res, err, n)
	}
	for _, id := range ids {
		if l := u.lease(id); l.State != broker.StateRevoked {
			t.Fatalf("lease %s: %v, want revoked", id, l.State)
		}
	}
	// Two commits per batch of 64: 4 for 100 leases; one revocation each
	// made 200.
	if w := wc.writes.Load(); w > 8 {
		t.Errorf("%d store writes to end %d leases, want at most 8", w, n)
	}
}
