package storetest

import (
	"errors"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// testOptionalReads checks the optional reads (broker.LeasesReader,
// broker.LeaseHinter) against GetLease, on a store that offers them.
func testOptionalReads(t *testing.T, open OpenFunc) {
	t.Run("GetLeases", func(t *testing.T) {
		s := open(t)
		r, ok := s.(broker.LeasesReader)
		if !ok {
			t.Skip("the store has no GetLeases")
		}
		ls := MustCreate(t, s,
			NewLease("a", "ro", "svc", at(time.Minute)),
			NewLease("b", "ro", "svc", at(2*time.Minute)))
		upd := ls[1]
		upd.ExpireTime = at(time.Hour)
		MustUpdate(t, s, upd)
		ids := []string{"b", "missing", "a", "b"}
		got, errs := r.GetLeases(t.Context(), ids)
		if len(got) != len(ids) || len(errs) != len(ids) {
			t.Fatalf("GetLeases returned %d leases and %d errors for %d ids", len(got), len(errs), len(ids))
		}
		for i, id := range ids {
			want, wantErr := s.GetLease(t.Context(), id)
			if wantErr != nil {
				if !errors.Is(errs[i], broker.ErrLeaseNotFound) || !errors.Is(wantErr, broker.ErrLeaseNotFound) {
					t.Errorf("GetLeases[%d] (%s) error %v, GetLease's %v; want ErrLeaseNotFound", i, id, errs[i], wantErr)
				}
				continue
			}
			if errs[i] != nil {
				t.Errorf("GetLeases[%d] (%s): %v", i, id, errs[i])
				continue
			}
			assertLeaseEqual(t, got[i], want)
		}
		if _, errs := r.GetLeases(t.Context(), nil); len(errs) != 0 {
			t.Errorf("GetLeases(nil) returned %d errors", len(errs))
		}
	})
	t.Run("LeaseHint", func(t *testing.T) {
		s := open(t)
		h, ok := s.(broker.LeaseHinter)
		if !ok {
			t.Skip("the store has no LeaseHint")
		}
		l := MustCreate(t, s, NewLease("a", "ro", "svc", at(time.Minute)))[0]
		// Possibly stale, never invented: a version the lease had, or
		// not found.
		got, err := h.LeaseHint(t.Context(), "a")
		switch {
		case errors.Is(err, broker.ErrLeaseNotFound):
		case err != nil:
			t.Fatalf("LeaseHint: %v", err)
		default:
			assertLeaseEqual(t, got, l)
		}
		if _, err := h.LeaseHint(t.Context(), "missing"); !errors.Is(err, broker.ErrLeaseNotFound) {
			t.Errorf("LeaseHint(missing) error %v, want ErrLeaseNotFound", err)
		}
		hs, errs := h.LeaseHints(t.Context(), []string{"missing", "a"})
		if len(hs) != 2 || len(errs) != 2 {
			t.Fatalf("LeaseHints returned %d leases and %d errors for 2 ids", len(hs), len(errs))
		}
		if !errors.Is(errs[0], broker.ErrLeaseNotFound) {
			t.Errorf("LeaseHints[missing] error %v, want ErrLeaseNotFound", errs[0])
		}
		switch {
		case errors.Is(errs[1], broker.ErrLeaseNotFound):
		case errs[1] != nil:
			t.Errorf("LeaseHints[a]: %v", errs[1])
		default:
			assertLeaseEqual(t, hs[1], l)
		}
	})
}
