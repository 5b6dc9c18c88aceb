package store

import (
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestWritePanicFailsOnlyItsCall checks that a write function that panics
// gets an error back and the store keeps committing other writes.
func TestWritePanicFailsOnlyItsCall(t *testing.T) {
	s := openStore(t)
	err := s.write(t.Context(), func(*bolt.Tx) error { panic("boom") })
	if err == nil {
		t.Fatal("a panicking write returned no error")
	}
	l := newLease("after", "ro", "svc", at(time.Minute))
	if err := s.CreateLease(t.Context(), &l); err != nil {
		t.Fatalf("CreateLease after a panicking write: %v", err)
	}
	mustGet(t, s, "after")
}
