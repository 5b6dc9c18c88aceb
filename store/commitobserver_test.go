package store

import (
	"path/filepath"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestCommitObserverSeesEveryWriteTransaction checks that Options.
// CommitObserver is called once per read-write transaction, on both write
// paths (the group commit and update), also for one that fails, and never
// for a read.
func TestCommitObserverSeesEveryWriteTransaction(t *testing.T) {
	var mu sync.Mutex
	var seen []time.Duration
	s, err := Open(filepath.Join(t.TempDir(), "leases.db"), Options{NoSync: true, CommitObserver: func(d time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, d)
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(seen)
	}
	// Opening a new file writes its schema outside the observer: count
	// from here.
	base := count()

	// Each call waits for its own commit, so each is a group of one.
	l := newLease("observed", "ro", "svc", at(time.Minute))
	if err := s.CreateLease(t.Context(), &l); err != nil { // group commit
		t.Fatal(err)
	}
	if err := s.DeleteIntent(t.Context(), "none"); err != nil { // group commit
		t.Fatal(err)
	}
	if _, err := s.PurgeTombstones(t.Context(), at(time.Hour), 10); err != nil { // update
		t.Fatal(err)
	}
	if err := s.write(t.Context(), func(*bolt.Tx) error { panic("boom") }); err == nil { // fails, rolled back
		t.Fatal("a panicking write returned no error")
	}
	mustGet(t, s, "observed") // a read: not observed

	if got := count() - base; got != 4 {
		t.Fatalf("observed %d write transactions, want 4", got)
	}
	mu.Lock()
	defer mu.Unlock()
	for i, d := range seen[base:] {
		if d <= 0 {
			t.Errorf("transaction %d observed as taking %v", i, d)
		}
	}
}
