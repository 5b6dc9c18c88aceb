// Package storetest is the contract suite every broker.LeaseStore must
// pass: the behaviour the broker relies on, as documented on
// broker.LeaseStore, checked through that interface alone. A backend's
// package runs it from a test:
//
//	func TestContract(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) broker.LeaseStore { ... })
//	}
//
// What only one backend does (file modes, locks, schema migrations, group
// commit) is tested in that backend's package, not here.
package storetest

import (
	"reflect"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// OpenFunc returns a new, empty store for one test. It should close the
// store in t.Cleanup; the suite may close it earlier (Close is idempotent).
type OpenFunc func(t *testing.T) broker.LeaseStore

// ReopenFunc is OpenFunc for a store that persists: it also returns reopen,
// which opens the same store again once the first has been closed (and
// should close what it opens in t.Cleanup).
type ReopenFunc func(t *testing.T) (s broker.LeaseStore, reopen func(t *testing.T) broker.LeaseStore)

// cases are the contract's parts, each a subtest of Run.
var cases = []struct {
	name string
	run  func(t *testing.T, open OpenFunc)
}{
	{"Intents", testIntents},
	{"CreateLease", testCreateLease},
	{"Issuing", testIssuing},
	{"GetLease", testGetLease},
	{"OptionalReads", testOptionalReads},
	{"UpdateLease", testUpdateLease},
	{"UpdateLeases", testUpdateLeases},
	{"DeleteLease", testDeleteLease},
	{"ListLeases", testListLeases},
	{"ScanExpiry", testScanExpiry},
	{"PurgeTombstones", testPurgeTombstones},
	{"LastIssued", testLastIssued},
	{"GroupID", testGroupID},
	{"Concurrency", testConcurrency},
	{"CanceledContext", testCanceledContext},
	{"Closed", testClosed},
}

// Run runs the contract suite, each case on a fresh store from open.
func Run(t *testing.T, open OpenFunc) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.run(t, open) })
	}
}

// RunReopen checks that what a store acknowledged is there after it is
// closed and opened again, revisions included. Run it, besides Run, on
// backends that persist.
func RunReopen(t *testing.T, open ReopenFunc) {
	t.Helper()
	t.Run("Reopen", func(t *testing.T) { testReopen(t, open) })
}

// The fixtures below are exported for a backend's own tests, so that they
// build leases as the contract does.

// T0 is an arbitrary instant with nanoseconds, so tests see any loss of
// precision.
var T0 = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

func at(d time.Duration) time.Time { return T0.Add(d) }

// NewLease returns an active lease with every field a new lease has set,
// issued at T0.
func NewLease(id, role, client string, expire time.Time) broker.Lease {
	return broker.Lease{
		ID:            id,
		Role:          role,
		Client:        client,
		Target:        "main",
		Username:      "cb_" + role + "_" + id,
		ProxyRole:     role + "_role",
		IssueTime:     T0,
		ExpireTime:    expire,
		MaxExpireTime: T0.Add(time.Hour),
		State:         broker.StateActive,
		Metadata:      map[string]string{"pod": "api-" + id, "ns": "prod"},
	}
}

// ended returns l as a tombstone in state (Revoked or Expired) ended at end.
func ended(l broker.Lease, state broker.LeaseState, end time.Time) broker.Lease {
	l.State, l.EndTime = state, end
	return l
}

// MustCreate creates each lease (a copy of it) and returns them as
// created, with their revisions.
func MustCreate(t *testing.T, s broker.LeaseStore, leases ...broker.Lease) []broker.Lease {
	t.Helper()
	out := make([]broker.Lease, 0, len(leases))
	for _, l := range leases {
		l = l.Clone()
		if err := s.CreateLease(t.Context(), &l); err != nil {
			t.Fatalf("CreateLease(%s): %v", l.ID, err)
		}
		out = append(out, l)
	}
	return out
}

// MustGet returns the stored lease with that id.
func MustGet(t *testing.T, s broker.LeaseStore, id string) broker.Lease {
	t.Helper()
	l, err := s.GetLease(t.Context(), id)
	if err != nil {
		t.Fatalf("GetLease(%s): %v", id, err)
	}
	return l
}

// MustUpdate updates l and returns it as stored.
func MustUpdate(t *testing.T, s broker.LeaseStore, l broker.Lease) broker.Lease {
	t.Helper()
	got, err := s.UpdateLease(t.Context(), l)
	if err != nil {
		t.Fatalf("UpdateLease(%s): %v", l.ID, err)
	}
	return got
}

func listAll(t *testing.T, s broker.LeaseStore) []broker.Lease {
	t.Helper()
	all, next, err := s.ListLeases(t.Context(), broker.LeaseFilter{})
	if err != nil {
		t.Fatalf("ListLeases: %v", err)
	}
	if next != "" {
		t.Errorf("unlimited ListLeases returned next %q", next)
	}
	return all
}

// ScanExpiry returns every entry ScanExpiry reports, in its order.
func ScanExpiry(t *testing.T, s broker.LeaseStore) []broker.ExpiryEntry {
	t.Helper()
	var out []broker.ExpiryEntry
	if err := s.ScanExpiry(t.Context(), func(e broker.ExpiryEntry) bool {
		out = append(out, e)
		return true
	}); err != nil {
		t.Fatalf("ScanExpiry: %v", err)
	}
	return out
}

func scanIDs(t *testing.T, s broker.LeaseStore) []string {
	t.Helper()
	var out []string
	for _, e := range ScanExpiry(t, s) {
		out = append(out, e.LeaseID)
	}
	return out
}

// IDs returns the leases' ids, in order.
func IDs(leases []broker.Lease) []string {
	out := make([]string, len(leases))
	for i, l := range leases {
		out[i] = l.ID
	}
	return out
}

// normalize puts a lease in a form where equal leases are DeepEqual: times
// in UTC without a monotonic reading, empty metadata nil.
func normalize(l broker.Lease) broker.Lease {
	for _, p := range []*time.Time{&l.IssueTime, &l.ExpireTime, &l.MaxExpireTime, &l.NextAttempt, &l.EndTime,
		&l.Usage.FirstSeen, &l.Usage.LastSeen, &l.Usage.LastQueryStart} {
		if !p.IsZero() {
			*p = p.UTC().Round(0)
		}
	}
	if len(l.Metadata) == 0 {
		l.Metadata = nil
	}
	return l
}

// assertLeaseEqual compares every field, Revision included.
func assertLeaseEqual(t *testing.T, got, want broker.Lease) {
	t.Helper()
	if g, w := normalize(got), normalize(want); !reflect.DeepEqual(g, w) {
		t.Errorf("lease mismatch\n got: %+v\nwant: %+v", g, w)
	}
}

// assertSameButRevision compares every field but Revision.
func assertSameButRevision(t *testing.T, got, want broker.Lease) {
	t.Helper()
	got.Revision, want.Revision = 0, 0
	assertLeaseEqual(t, got, want)
}
