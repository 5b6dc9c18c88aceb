package etcd_test

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/store/storetest"
)

// writtenAt returns the keys the Txn at revision rev wrote under prefix
// (puts and deletes), from a watch of that revision alone.
func writtenAt(t *testing.T, cli *clientv3.Client, prefix string, rev int64) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	// Events of one revision come in one response: the first.
	resp, ok := <-cli.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev))
	if !ok {
		t.Fatalf("watch at revision %d ended: %v", rev, ctx.Err())
	}
	if err := resp.Err(); err != nil {
		t.Fatalf("watch at revision %d: %v", rev, err)
	}
	var keys []string
	for _, ev := range resp.Events {
		if ev.Kv.ModRevision == rev {
			keys = append(keys, ev.Type.String()+" "+string(ev.Kv.Key[len(prefix):]))
		}
	}
	return keys
}

// A renewal (the expiry moved later, nothing else of the index's value
// changed) writes the lease record alone: its expiry key stays at the
// earlier instant, a lower bound (broker.LeaseStore.ScanExpiry). An
// update that moves the lease earlier, or ends it, moves the key; and a
// store that never saw the renewal (no cache: it reads the record) finds
// the key where it is, so none is left behind.
func TestRenewalWritesTheRecordAlone(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	s := openAt(t, eps, prefix)
	other := openAt(t, eps, prefix)
	l := createN(t, s, 1, nil)[0]
	created := l.ExpireTime

	for i := 1; i <= 3; i++ {
		l.ExpireTime = created.Add(time.Duration(i) * time.Minute)
		l = storetest.MustUpdate(t, s, l)
		if got := writtenAt(t, s.Client(), prefix, int64(l.Revision)); len(got) != 1 || got[0] != "PUT lease/"+l.ID {
			t.Errorf("renewal %d wrote %q, want the lease record alone", i, got)
		}
	}
	if idx := expiryIDs(t, s); len(idx) != 1 || !idx[l.ID].Equal(created) {
		t.Errorf("expiry index %v after renewals, want %s at %v (where it was)", idx, l.ID, created)
	}

	// The other store has not seen the lease: it reads the record, which
	// names where its key is.
	l.State, l.EndTime = broker.StateRevoking, created.Add(30*time.Second)
	l = storetest.MustUpdate(t, other, l)
	got := writtenAt(t, s.Client(), prefix, int64(l.Revision))
	if len(got) != 3 {
		t.Errorf("a revocation under way wrote %q, want the record and the key moved", got)
	}
	if idx := expiryIDs(t, s); len(idx) != 1 || !idx[l.ID].Equal(l.EndTime) {
		t.Errorf("expiry index %v after the revocation began, want only %s at %v", idx, l.ID, l.EndTime)
	}

	// Renewed again after a state change, then deleted by a store that
	// reads the record: no key is left behind.
	l.State, l.EndTime = broker.StateActive, time.Time{}
	l.ExpireTime = created.Add(10 * time.Minute)
	l = storetest.MustUpdate(t, s, l)
	l.ExpireTime = created.Add(20 * time.Minute)
	l = storetest.MustUpdate(t, s, l)
	fresh := openAt(t, eps, prefix)
	if err := fresh.DeleteLease(t.Context(), l.ID); err != nil {
		t.Fatal(err)
	}
	if idx := expiryIDs(t, s); len(idx) != 0 {
		t.Errorf("expiry index %v after the delete, want empty", idx)
	}
	resp, err := s.Client().Get(t.Context(), prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if k := string(kv.Key[len(prefix):]); k != "group" && !strings.HasPrefix(k, "lastissued/") {
			t.Errorf("key %q left after the delete", k)
		}
	}
}
