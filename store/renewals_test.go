package store

import (
	"errors"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// TestUpdateLeasesPerLeaseResults: one call, one transaction, and every
// entry succeeds or fails on its own.
func TestUpdateLeasesPerLeaseResults(t *testing.T) {
	s := openStore(t)
	created := mustCreate(t, s,
		newLease("a", "ro", "svc", at(time.Minute)),
		newLease("b", "ro", "svc", at(time.Minute)),
		newLease("c", "ro", "svc", at(time.Minute)),
	)
	a, b, c := created[0], created[1], created[2]
	a.ExpireTime = at(time.Hour)
	b.ExpireTime = at(2 * time.Hour)
	b.Revision = 7 // stale base: conflict
	c.ExpireTime = at(3 * time.Hour)
	missing := newLease("zz", "ro", "svc", at(time.Hour))
	invalid := created[2].Clone()
	invalid.State = broker.StateUnspecified
	a2 := a // the same lease twice: the second write is based on a moved revision

	in := []broker.Lease{a, b, missing, c, invalid, a2}
	got, errs := s.UpdateLeases(t.Context(), in)
	if len(got) != len(in) || len(errs) != len(in) {
		t.Fatalf("UpdateLeases returned %d leases and %d errors for %d inputs", len(got), len(errs), len(in))
	}
	want := []error{nil, broker.ErrConflict, broker.ErrLeaseNotFound, nil, broker.ErrInvalidArgument, broker.ErrConflict}
	for i, w := range want {
		if w == nil && errs[i] != nil || w != nil && !errors.Is(errs[i], w) {
			t.Errorf("entry %d (%s): error %v, want %v", i, in[i].ID, errs[i], w)
		}
	}
	for _, i := range []int{0, 3} {
		wantLease := in[i]
		wantLease.Revision = created[i/3*2].Revision + 1
		assertLeaseEqual(t, got[i], wantLease)
		assertLeaseEqual(t, mustGet(t, s, in[i].ID), got[i])
	}
	assertLeaseEqual(t, mustGet(t, s, "b"), created[1]) // untouched
	checkIndexes(t, s)

	// The expiry index moved with the renewed leases.
	var order []string
	if err := s.ScanExpiry(t.Context(), func(e broker.ExpiryEntry) bool { order = append(order, e.LeaseID); return true }); err != nil {
		t.Fatal(err)
	}
	if len(order) != 3 || order[0] != "b" || order[1] != "a" || order[2] != "c" {
		t.Errorf("expiry order %q, want [b a c]", order)
	}
}

func TestUpdateLeasesClosedStore(t *testing.T) {
	s := openStore(t)
	l := mustCreate(t, s, newLease("a", "ro", "svc", at(time.Minute)))[0]
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, errs := s.UpdateLeases(t.Context(), []broker.Lease{l})
	if !errors.Is(errs[0], broker.ErrClosed) {
		t.Errorf("UpdateLeases on a closed store: %v, want ErrClosed", errs[0])
	}
}
