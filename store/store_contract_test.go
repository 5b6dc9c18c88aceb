package store

import (
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
}
