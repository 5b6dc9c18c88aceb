package storetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

func testConcurrency(t *testing.T, open OpenFunc) {
	// Writers each read, increment a counter and write back. Compare-and-
	// set must give each revision exactly one winner, so the counter ends
	// equal to the number of wins: no lost updates.
	t.Run("UpdateLease: one winner per revision", func(t *testing.T) {
		s := open(t)
		ctx := t.Context()
		first := MustCreate(t, s, NewLease("hot", "ro", "svc", at(time.Minute)))[0]

		const workers, wins = 8, 40
		var (
			mu        sync.Mutex
			winners   = map[uint64]int{} // revision -> worker that wrote it
			bases     = map[uint64]int{} // revision a win was based on -> worker
			conflicts atomic.Int64
		)
		race(t, workers, nil, func(w int) error {
			for {
				cur, err := s.GetLease(ctx, "hot")
				if err != nil || cur.RevokeAttempts >= wins {
					return err
				}
				base := cur.Revision
				cur.RevokeAttempts++
				got, err := s.UpdateLease(ctx, cur)
				if errors.Is(err, broker.ErrConflict) {
					conflicts.Add(1)
					continue
				}
				if err != nil {
					return err
				}
				mu.Lock()
				if prev, dup := winners[got.Revision]; dup {
					t.Errorf("revision %d won by workers %d and %d", got.Revision, prev, w)
				}
				if prev, dup := bases[base]; dup {
					t.Errorf("two wins based on revision %d, by workers %d and %d", base, prev, w)
				}
				winners[got.Revision], bases[base] = w, w
				mu.Unlock()
			}
		})

		final := MustGet(t, s, "hot")
		revs := slices.Sorted(maps.Keys(winners))
		if final.RevokeAttempts != wins || len(winners) != wins {
			t.Errorf("final counter %d after %d winning updates, want %d", final.RevokeAttempts, len(winners), wins)
		}
		if len(revs) > 0 && (revs[0] <= first.Revision || final.Revision != revs[len(revs)-1]) {
			t.Errorf("created at revision %d, wins at %v, final revision %d", first.Revision, revs, final.Revision)
		}
		// The wins form one chain: each was based on the one before.
		if _, ok := bases[first.Revision]; !ok {
			t.Errorf("no win was based on the created revision %d", first.Revision)
		}
		for _, r := range revs[:max(len(revs)-1, 0)] {
			if _, ok := bases[r]; !ok {
				t.Errorf("no win was based on revision %d", r)
			}
		}
		t.Logf("%d wins, %d conflicts", len(winners), conflicts.Load())
	})

	t.Run("UpdateLeases: one winner per revision", func(t *testing.T) {
		s := open(t)
		created := MustCreate(t, s, NewLease("hot", "ro", "svc", at(time.Minute)))[0]
		const workers = 8
		wins := race(t, workers, broker.ErrConflict, func(w int) error {
			l := created.Clone()
			l.ExpireTime = at(time.Duration(w+2) * time.Minute)
			_, errs := s.UpdateLeases(t.Context(), []broker.Lease{l})
			return errs[0]
		})
		if wins != 1 {
			t.Errorf("%d updates based on one revision succeeded, want 1", wins)
		}
		if got := ScanExpiry(t, s); len(got) != 1 {
			t.Errorf("ScanExpiry after racing updates = %+v, want one entry", got)
		}
	})

	t.Run("CreateLease", func(t *testing.T) {
		const workers = 16
		tests := []struct {
			name     string
			id       func(w int) string
			wantWins int
		}{
			{"same id: one winner", func(int) string { return "contested" }, 1},
			{"distinct ids: all stored", func(w int) string { return fmt.Sprintf("w%02d", w) }, workers},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				s := open(t)
				wins := race(t, workers, broker.ErrExists, func(w int) error {
					l := NewLease(tt.id(w), "ro", "svc", at(time.Duration(w)*time.Second))
					return s.CreateLease(t.Context(), &l)
				})
				if wins != tt.wantWins {
					t.Errorf("%d creates succeeded, want %d", wins, tt.wantWins)
				}
				if all := listAll(t, s); len(all) != tt.wantWins {
					t.Errorf("%d leases stored, want %d", len(all), tt.wantWins)
				}
				if got := ScanExpiry(t, s); len(got) != tt.wantWins {
					t.Errorf("%d expiry entries, want %d", len(got), tt.wantWins)
				}
			})
		}
	})
}

// race runs call(w) for w in [0, n) on n goroutines at once and returns
// how many calls succeeded. A call may also fail with lost (nil: it may
// not); any other error fails the test.
func race(t *testing.T, n int, lost error, call func(w int) error) int {
	t.Helper()
	var (
		wins  atomic.Int64
		wg    sync.WaitGroup
		start = make(chan struct{})
	)
	for w := range n {
		wg.Go(func() {
			<-start
			switch err := call(w); {
			case err == nil:
				wins.Add(1)
			case errors.Is(err, lost):
			default:
				t.Errorf("racing call %d: %v", w, err)
			}
		})
	}
	close(start)
	wg.Wait()
	return int(wins.Load())
}

// storeCalls exercises every method of broker.LeaseStore but Close, on a
// store holding lease "l" (at revision rev) and intent "i".
func storeCalls(rev uint64) []struct {
	name string
	call func(ctx context.Context, s broker.LeaseStore) error
} {
	updated := NewLease("l", "ro", "svc", at(time.Hour))
	updated.Revision = rev
	return []struct {
		name string
		call func(ctx context.Context, s broker.LeaseStore) error
	}{
		{"PutIntent", func(ctx context.Context, s broker.LeaseStore) error {
			return s.PutIntent(ctx, broker.Intent{LeaseID: "x", CreateTime: T0})
		}},
		{"DeleteIntent", func(ctx context.Context, s broker.LeaseStore) error { return s.DeleteIntent(ctx, "i") }},
		{"ListIntents", func(ctx context.Context, s broker.LeaseStore) error { _, err := s.ListIntents(ctx); return err }},
		{"CreateLease", func(ctx context.Context, s broker.LeaseStore) error {
			l := NewLease("new", "ro", "svc", at(time.Minute))
			return s.CreateLease(ctx, &l)
		}},
		{"UpdateLease", func(ctx context.Context, s broker.LeaseStore) error {
			_, err := s.UpdateLease(ctx, updated)
			return err
		}},
		{"UpdateLeases", func(ctx context.Context, s broker.LeaseStore) error {
			_, errs := s.UpdateLeases(ctx, []broker.Lease{updated})
			return errs[0]
		}},
		{"GetLease", func(ctx context.Context, s broker.LeaseStore) error { _, err := s.GetLease(ctx, "l"); return err }},
		{"DeleteLease", func(ctx context.Context, s broker.LeaseStore) error { return s.DeleteLease(ctx, "l") }},
		{"ListLeases", func(ctx context.Context, s broker.LeaseStore) error {
			_, _, err := s.ListLeases(ctx, broker.LeaseFilter{})
			return err
		}},
		{"ScanExpiry", func(ctx context.Context, s broker.LeaseStore) error {
			return s.ScanExpiry(ctx, func(broker.ExpiryEntry) bool { return true })
		}},
		{"PurgeTombstones", func(ctx context.Context, s broker.LeaseStore) error {
			_, err := s.PurgeTombstones(ctx, at(time.Hour), 10)
			return err
		}},
		{"GroupID", func(ctx context.Context, s broker.LeaseStore) error { _, err := s.GroupID(ctx); return err }},
	}
}

// seedCalls gives the store what storeCalls expects, and returns lease "l".
func seedCalls(t *testing.T, s broker.LeaseStore) broker.Lease {
	t.Helper()
	l := MustCreate(t, s, NewLease("l", "ro", "svc", at(time.Minute)))[0]
	if err := s.PutIntent(t.Context(), broker.Intent{LeaseID: "i", CreateTime: T0}); err != nil {
		t.Fatal(err)
	}
	return l
}

func testCanceledContext(t *testing.T, open OpenFunc) {
	s := open(t)
	l := seedCalls(t, s)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	for _, c := range storeCalls(l.Revision) {
		t.Run(c.name, func(t *testing.T) {
			if err := c.call(ctx, s); !errors.Is(err, context.Canceled) {
				t.Errorf("with a canceled context: %v, want context.Canceled", err)
			}
		})
	}
	t.Run("nothing changed", func(t *testing.T) {
		assertLeaseEqual(t, MustGet(t, s, "l"), l)
		if got := IDs(listAll(t, s)); !slices.Equal(got, []string{"l"}) {
			t.Errorf("leases after canceled calls: %q", got)
		}
		if in, err := s.ListIntents(t.Context()); err != nil || len(in) != 1 || in[0].LeaseID != "i" {
			t.Errorf("intents after canceled calls: %+v, %v", in, err)
		}
	})
}

func testClosed(t *testing.T, open OpenFunc) {
	s := open(t)
	l := seedCalls(t, s)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for _, c := range storeCalls(l.Revision) {
		t.Run(c.name, func(t *testing.T) {
			if err := c.call(t.Context(), s); !errors.Is(err, broker.ErrClosed) {
				t.Errorf("after Close: %v, want ErrClosed", err)
			}
		})
	}
	if r, ok := s.(broker.LastIssuedReader); ok {
		t.Run("LastIssued", func(t *testing.T) {
			if _, err := r.LastIssued(t.Context()); !errors.Is(err, broker.ErrClosed) {
				t.Errorf("after Close: %v, want ErrClosed", err)
			}
		})
	}
}

func testReopen(t *testing.T, open ReopenFunc) {
	s, reopen := open(t)
	ctx := t.Context()
	leases := MustCreate(t, s,
		NewLease("a", "ro", "svc", at(2*time.Minute)),
		NewLease("b", "rw", "ops", at(1*time.Minute)),
		NewLease("c", "rw", "ops", at(3*time.Minute)),
	)
	leases[1] = MustUpdate(t, s, ended(leases[1], broker.StateRevoked, at(time.Minute)))
	if err := s.DeleteLease(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	leases = leases[:2]
	group, err := s.GroupID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	in := broker.Intent{LeaseID: "d", Target: "main", Username: "cb_d", ProxyRole: "ro_role", CreateTime: at(0), Group: group}
	if err := s.PutIntent(ctx, in); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = reopen(t)
	// The group survives a restart: the same store is the same group, so
	// a broker restarted on it still owns its marker roles.
	if got, err := s.GroupID(ctx); err != nil || got != group {
		t.Errorf("GroupID after reopen = %q, %v; want %q", got, err, group)
	}
	for _, want := range leases {
		assertLeaseEqual(t, MustGet(t, s, want.ID), want)
	}
	if got := IDs(listAll(t, s)); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("ListLeases after reopen = %q", got)
	}
	got := ScanExpiry(t, s)
	if len(got) != 1 || got[0].LeaseID != "a" {
		t.Fatalf("ScanExpiry after reopen = %+v, want lease a only", got)
	}
	checkEntry(t, got[0], leases[0])
	intents, err := s.ListIntents(ctx)
	if err == nil && len(intents) == 1 {
		intents[0].CreateTime = normalizeTime(intents[0].CreateTime)
	}
	if err != nil || !reflect.DeepEqual(intents, []broker.Intent{in}) {
		t.Errorf("ListIntents after reopen = %+v, %v", intents, err)
	}
	// Revisions carry on from before, so a CAS based on a read before the
	// restart still works, and its result is newer.
	updated := MustUpdate(t, s, leases[0])
	if updated.Revision <= leases[0].Revision {
		t.Errorf("revision after reopen and update = %d, not after %d", updated.Revision, leases[0].Revision)
	}
	// The tombstone is still indexed for the purge.
	if n, err := s.PurgeTombstones(ctx, at(time.Hour), 10); err != nil || n != 1 {
		t.Errorf("PurgeTombstones after reopen = %d, %v; want 1", n, err)
	}
}

// testGroupID: one id per store, created once, the same for concurrent
// first callers, of the shape broker.NewGroupID makes; and another store
// is another group.
func testGroupID(t *testing.T, open OpenFunc) {
	s := open(t)
	ctx := t.Context()
	const callers = 8
	ids := make([]string, callers)
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() { ids[i], errs[i] = s.GroupID(ctx) })
	}
	wg.Wait()
	for i := range callers {
		if errs[i] != nil {
			t.Fatalf("GroupID: %v", errs[i])
		}
		if ids[i] != ids[0] {
			t.Fatalf("concurrent first GroupID calls returned %q and %q", ids[0], ids[i])
		}
	}
	if err := broker.ValidateLeaseID(ids[0]); err != nil { // NewGroupID's shape
		t.Errorf("GroupID = %q: %v", ids[0], err)
	}
	if again, err := s.GroupID(ctx); err != nil || again != ids[0] {
		t.Errorf("second GroupID = %q, %v; want %q", again, err, ids[0])
	}
	if other, err := open(t).GroupID(ctx); err != nil || other == ids[0] {
		t.Errorf("another store's GroupID = %q, %v; want a different id", other, err)
	}
}
