package store_test

import (
	"path/filepath"
	"testing"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/storetest"
)

// openAt opens the store at path and closes it at the end of the test.
// Tests skip fsync: durability is bbolt's, not under test here.
func openAt(t *testing.T, path string) broker.LeaseStore {
	t.Helper()
	s, err := store.Open(path, store.Options{NoSync: true})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) broker.LeaseStore {
		return openAt(t, filepath.Join(t.TempDir(), "leases.db"))
	})
	storetest.RunReopen(t, func(t *testing.T) (broker.LeaseStore, func(*testing.T) broker.LeaseStore) {
		path := filepath.Join(t.TempDir(), "leases.db")
		return openAt(t, path), func(t *testing.T) broker.LeaseStore { return openAt(t, path) }
	})
}
