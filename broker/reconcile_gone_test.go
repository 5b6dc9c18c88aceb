package broker_test

import (
	"context"
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
