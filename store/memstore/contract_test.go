package memstore_test

import (
	"bytes"
	"testing"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store/memstore"
	"github.com/credbroker/credbroker/store/storetest"
)

var (
	_ broker.LeaseStore       = (*memstore.Store)(nil)
	_ broker.LastIssuedReader = (*memstore.Store)(nil)
)

// TestContract: the in-memory store passes the contract every LeaseStore
// passes, so the domain's unit tests on it mean what they say about bbolt.
func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) broker.LeaseStore {
		s := memstore.New()
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
	storetest.RunSnapshot(t, func(t *testing.T) broker.LeaseStore {
		s := memstore.New()
		t.Cleanup(func() { _ = s.Close() })
		return s
	}, func(t *testing.T, snapshot []byte) broker.LeaseStore {
		s, err := memstore.Restore(bytes.NewReader(snapshot))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}
