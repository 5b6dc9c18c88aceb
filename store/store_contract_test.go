package store

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store/storetest"
)

// TestContract runs the LeaseStore contract suite on bbolt.
func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) broker.LeaseStore { return openStore(t) })
	storetest.RunReopen(t, func(t *testing.T) (broker.LeaseStore, func(*testing.T) broker.LeaseStore) {
		path := filepath.Join(t.TempDir(), "leases.db")
		return openStoreAt(t, path), func(t *testing.T) broker.LeaseStore { return openStoreAt(t, path) }
	})
	storetest.RunSnapshot(t, func(t *testing.T) broker.LeaseStore { return openStore(t) },
		func(t *testing.T, snapshot []byte) broker.LeaseStore {
			// A restore is the snapshot put where store.path points.
			path := filepath.Join(t.TempDir(), "restored.db")
			if err := os.WriteFile(path, snapshot, 0o600); err != nil {
				t.Fatal(err)
			}
			return openStoreAt(t, path)
		})
}
