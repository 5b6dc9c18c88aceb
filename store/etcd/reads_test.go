package etcd_test

import (
	"errors"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/storetest"
)

// expiryIDs scans the expiry index into id -> instant.
func expiryIDs(t *testing.T, s broker.LeaseStore) map[string]time.Time {
	t.Helper()
	got := map[string]time.Time{}
	if err := s.ScanExpiry(t.Context(), func(e broker.ExpiryEntry) bool {
		if _, dup := got[e.LeaseID]; dup {
			t.Errorf("lease %s twice in the expiry index", e.LeaseID)
		}
		got[e.LeaseID] = e.Expire
		return true
	}); err != nil {
		t.Fatal(err)
	}
	return got
}

// An update of a lease this store created, read or wrote at that revision
// sends no read first (the index cache), and still moves the index key
// (earlier: a later instant may leave it, TestRenewalWritesTheRecordAlone);
// one another instance changed meanwhile is read, and the stale
// revision loses.
func TestUpdateLeasesSkipsTheReadAtAKnownRevision(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	s := openAt(t, eps, prefix)
	other := openAt(t, eps, prefix)
	leases := createN(t, s, 3, nil)

	in := make([]broker.Lease, len(leases))
	for i, l := range leases {
		l.ExpireTime = at(-time.Hour + time.Duration(i)*time.Second)
		in[i] = l
	}
	before := etcd.Reads(s)
	out, errs := s.UpdateLeases(t.Context(), in)
	for i, err := range errs {
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
	}
	if n := etcd.Reads(s) - before; n != 0 {
		t.Errorf("UpdateLeases of leases this store created sent %d reads, want 0", n)
	}
	idx := expiryIDs(t, s)
	for i, l := range out {
		if !idx[l.ID].Equal(in[i].ExpireTime) {
			t.Errorf("lease %s in the expiry index at %v, want %v", l.ID, idx[l.ID], in[i].ExpireTime)
		}
	}
	if len(idx) != len(out) {
		t.Errorf("%d expiry entries, want %d (an old index key left behind)", len(idx), len(out))
	}

	// Another instance moves lease 0; s learns the new revision only
	// from other's answer, so it must read (its cache knows an older one).
	moved := out[0]
	moved.ExpireTime = at(-2 * time.Hour)
	moved = storetest.MustUpdate(t, other, moved)
	if _, err := s.UpdateLease(t.Context(), out[0]); !errors.Is(err, broker.ErrConflict) {
		t.Fatalf("update at the stale revision: %v, want ErrConflict", err)
	}
	moved.ExpireTime = at(-3 * time.Hour)
	before = etcd.Reads(s)
	if _, err := s.UpdateLease(t.Context(), moved); err != nil {
		t.Fatal(err)
	}
	if n := etcd.Reads(s) - before; n != 1 {
		t.Errorf("update at a revision s never saw sent %d reads, want 1", n)
	}
	idx = expiryIDs(t, s)
	if !idx[moved.ID].Equal(at(-3*time.Hour)) || len(idx) != len(out) {
		t.Errorf("expiry index %v after the moves, want %s at %v and %d entries", idx, moved.ID, at(-3*time.Hour), len(out))
	}
}

// GetLeases reads many leases in one request per 128.
func TestGetLeasesOneReadPer128(t *testing.T) {
	s := openStore(t)
	leases := createN(t, s, 130, nil)
	ids := make([]string, 0, len(leases)+1)
	for _, l := range leases {
		ids = append(ids, l.ID)
	}
	ids = append(ids, "missing")
	before := etcd.Reads(s)
	got, errs := s.GetLeases(t.Context(), ids)
	if n := etcd.Reads(s) - before; n != 2 {
		t.Errorf("GetLeases of %d ids sent %d reads, want 2", len(ids), n)
	}
	for i, l := range leases {
		if errs[i] != nil || got[i].ID != l.ID || got[i].Revision != l.Revision {
			t.Errorf("entry %d: %+v, %v; want lease %s at revision %d", i, got[i], errs[i], l.ID, l.Revision)
		}
	}
	if !errors.Is(errs[len(ids)-1], broker.ErrLeaseNotFound) {
		t.Errorf("missing: %v, want ErrLeaseNotFound", errs[len(ids)-1])
	}
}

// A hint of a lease this store wrote or read costs no request; one it
// never saw is one (serializable) read.
func TestLeaseHintFromWhatTheStoreSaw(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	s := openAt(t, eps, prefix)
	other := openAt(t, eps, prefix)
	mine := createN(t, s, 1, nil)[0]
	theirs := storetest.MustCreate(t, other, storetest.NewLease("theirs", "ro", "svc", at(time.Hour)))[0]

	before := etcd.Reads(s)
	got, err := s.LeaseHint(t.Context(), mine.ID)
	if err != nil || got.Revision != mine.Revision || got.Target != mine.Target {
		t.Fatalf("hint of a lease s created: %+v, %v", got, err)
	}
	if n := etcd.Reads(s) - before; n != 0 {
		t.Errorf("hint of a lease s created sent %d reads, want 0", n)
	}
	got, err = s.LeaseHint(t.Context(), theirs.ID)
	if err != nil || got.Revision != theirs.Revision {
		t.Fatalf("hint of a lease another store created: %+v, %v", got, err)
	}
	if n := etcd.Reads(s) - before; n != 1 {
		t.Errorf("hint of a lease s never saw sent %d reads, want 1", n)
	}
	// The hint is a copy.
	got.Metadata["pod"] = "changed"
	if again, _ := s.LeaseHint(t.Context(), theirs.ID); again.Metadata["pod"] == "changed" {
		t.Error("changing a hint changed the store's copy")
	}
}
