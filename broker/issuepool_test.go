package broker_test

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/credbroker/credbroker/broker"
)

// intentIDs lists the ids of the intents in the store.
func (e *env) intentIDs() map[string]bool {
	e.t.Helper()
	intents, err := e.store.ListIntents(context.Background())
	if err != nil {
		e.t.Fatalf("ListIntents: %v", err)
	}
	ids := map[string]bool{}
	for _, in := range intents {
		ids[in.LeaseID] = true
	}
	return ids
}

// TestIssuePool: after an issue, reservations for its role are made ready
// (intents in the store, which the reconciler leaves alone); the next
// issue takes one and its credential works; Close deletes the unused
// intents; and a broker that dies with reservations ready leaves nothing
// behind after its restart.
func TestIssuePool(t *testing.T) {
	const size = 3
	e := newEnv(t, func(c *broker.Config) { c.IssuePool = size })
	e.issue(roleRO, 0) // the pool is empty: this one takes the direct path
	waitFor(t, "the pool to fill", func() bool { return len(e.intentIDs()) == size })

	reserved := e.intentIDs()
	res, err := e.b.Reconcile(context.Background())
	if err != nil || res.IntentsSettled != 0 || len(e.intentIDs()) != size {
		t.Fatalf("Reconcile with reservations ready: %+v, %v; %d intents left, want %d", res, err, len(e.intentIDs()), size)
	}

	l, c := e.issue(roleRO, 0)
	if !reserved[l.ID] {
		t.Errorf("issued lease %s is not one of the reserved intents", l.ID)
	}
	conn, err := e.login(c)
	if err != nil {
		t.Fatalf("login with a credential issued from the pool: %v", err)
	}
	_ = conn.Close(context.Background())
	waitFor(t, "the pool to fill again", func() bool { return len(e.intentIDs()) == size })

	e.restart() // a clean stop: Close deletes the intents of unused reservations
	if n := len(e.intentIDs()); n != 0 {
		t.Errorf("%d intents left after a clean stop, want 0", n)
	}

	// Fill the pool again, then die: no Close, no more writes.
	e.issue(roleUpdater, 0)
	waitFor(t, "the pool to fill", func() bool { return len(e.intentIDs()) == size })
	e.sw.crashAt("before UpdateLease:revoking") // trips on the next store write
	_, _ = e.b.Revoke(context.Background(), l.ID)
	_ = e.b.Close() // its deletes fail: the process is as good as dead
	e.b = nil
	if n := len(e.intentIDs()); n != size {
		t.Fatalf("%d intents after the crash, want the %d reservations", n, size)
	}
	e.restart()
	if n := len(e.intentIDs()); n != 0 {
		t.Errorf("%d intents left after a crash and restart, want 0", n)
	}
	e.assertNoOrphans()
	// The reservations' users never existed: the audit log must not
	// report them dropped.
	raw, err := os.ReadFile(e.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(raw), string(broker.AuditReconcileDrop)); n != 0 {
		t.Errorf("the audit log reports %d reconcile drops after a crash with only reservations pending, want 0", n)
	}
}
