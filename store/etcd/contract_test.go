package etcd_test

import (
	"bytes"
	"os"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/storetest"
)

func TestMain(m *testing.M) { os.Exit(etcdtest.Main(m)) }

// openAt opens a store on the test binary's etcd under prefix, closed at
// the end of the test.
func openAt(t *testing.T, endpoints []string, prefix string) *etcd.Store {
	t.Helper()
	s, err := etcd.Open(t.Context(), etcd.Options{Endpoints: endpoints, Prefix: prefix, DialTimeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// openStore opens a store on a prefix of its own.
func openStore(t *testing.T) *etcd.Store {
	t.Helper()
	eps := etcdtest.Server(t)
	return openAt(t, eps, etcdtest.Prefix(t, eps))
}

// TestContract runs the LeaseStore contract suite on etcd, each case on a
// prefix of its own; reopening closes the client and opens another on
// the same prefix.
func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) broker.LeaseStore { return openStore(t) })
	storetest.RunReopen(t, func(t *testing.T) (broker.LeaseStore, func(*testing.T) broker.LeaseStore) {
		eps := etcdtest.Server(t)
		prefix := etcdtest.Prefix(t, eps)
		return openAt(t, eps, prefix), func(t *testing.T) broker.LeaseStore { return openAt(t, eps, prefix) }
	})
	storetest.RunSnapshot(t, func(t *testing.T) broker.LeaseStore { return openStore(t) },
		func(t *testing.T, snapshot []byte) broker.LeaseStore {
			eps := etcdtest.Server(t)
			prefix := etcdtest.Prefix(t, eps)
			opts := etcd.Options{Endpoints: eps, Prefix: prefix, DialTimeout: 10 * time.Second}
			if _, err := etcd.Restore(t.Context(), opts, bytes.NewReader(snapshot)); err != nil {
				t.Fatalf("Restore: %v", err)
			}
			// A second restore into the same prefix is refused.
			if _, err := etcd.Restore(t.Context(), opts, bytes.NewReader(snapshot)); err == nil {
				t.Error("Restore into a prefix that holds keys succeeded")
			}
			return openAt(t, eps, prefix)
		})
}
