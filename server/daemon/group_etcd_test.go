package daemon

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/store/etcd"
)

// lifecycleLog records one broker's lifecycle events.
type lifecycleLog struct {
	mu     sync.Mutex
	events []broker.AuditEvent
}

func watchLifecycle(b *broker.Broker) *lifecycleLog {
	l := &lifecycleLog{}
	b.WatchLifecycle(func(ev broker.AuditEvent) {
		l.mu.Lock()
		l.events = append(l.events, ev)
		l.mu.Unlock()
	})
	return l
}

// ended returns the events that end a lease (expire, revoke,
// reconcile_drop) at or after since.
func (l *lifecycleLog) ended(since time.Time) []broker.AuditEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []broker.AuditEvent
	for _, ev := range l.events {
		switch ev.Action {
		case broker.AuditExpire, broker.AuditRevoke, broker.AuditReconcileDrop:
			if !ev.Time.Before(since) {
				out = append(out, ev)
			}
		}
	}
	return out
}

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t *testing.T, what string, deadline time.Duration, cond func() bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("%s: not within %s", what, deadline)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func leading(d *Daemon) bool {
	ok, _ := d.leader.Leading()
	return ok
}

// TestGroupLeaderCutOffFromEtcd: two brokerd in one group on a
// three-member etcd; A talks to member 0 only, B to members 1 and 2.
// A leads and runs the expiry (B, following, ends no lease). When member
// 0 dies, A is cut off: its term ends before B's begins (the keep-alive
// watchdog ends it at 2/3 of the TTL, etcd lets B win after the TTL), B
// leads within session_ttl + 2 s and expires leases, and A ends none
// after B's election. Once A reaches etcd again, a write under its old
// fence is refused with ErrNotLeader, and it follows B.
func TestGroupLeaderCutOffFromEtcd(t *testing.T) {
	const ttl = 2 * time.Second
	cluster := etcdtest.StartCluster(t, 3)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	eps := cluster.Endpoints()

	var logsA syncbuf.Buffer
	optsA := testOptions()
	optsA.Logger = slog.New(slog.NewTextHandler(&logsA, nil))
	auditA := t.TempDir() + "/audit.log"
	a, err := Start(ctx, etcdConfig(t, tg, eps[:1], "/group/", "broker-a", ttl, "", "audit: {path: "+auditA+"}\n"), optsA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	eventsA := watchLifecycle(a.Broker())
	waitUntil(t, "A to lead", 30*time.Second, func() bool { return leading(a) })

	b, err := Start(ctx, etcdConfig(t, tg, eps[1:], "/group/", "broker-b", ttl, "", ""), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	eventsB := watchLifecycle(b.Broker())

	st, err := b.store.(*etcd.Store).GroupStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Leader != "broker-a" || len(st.Members) != 2 {
		t.Fatalf("status = %+v, want broker-a leading broker-a and broker-b", st)
	}

	// The leader expires a lease issued on it; the follower ends none.
	l1, _, err := a.Broker().Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "svc", TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "A to expire its lease", 30*time.Second, func() bool { return len(eventsA.ended(time.Time{})) == 1 })
	if ev := eventsA.ended(time.Time{})[0]; ev.LeaseID != l1.ID || ev.Action != broker.AuditExpire {
		t.Fatalf("A's event = %+v", ev)
	}
	if got := eventsB.ended(time.Time{}); len(got) != 0 {
		t.Fatalf("the follower ended leases: %+v", got)
	}

	// Cut A off.
	cut := time.Now()
	cluster.Members[0].Kill()
	waitUntil(t, "B to lead", ttl+2*time.Second+10*time.Second /* load */, func() bool { return leading(b) })
	_, bSince := b.leader.Leading()
	t.Logf("B leads %s after the cut (session_ttl %s)", bSince.Sub(cut).Round(time.Millisecond), ttl)
	aLeading, _ := a.leader.Leading()
	a.leader.mu.Lock()
	aEnded, oldFence := a.leader.ended, a.leader.fence
	a.leader.mu.Unlock()
	if aLeading || aEnded.IsZero() || !aEnded.Before(bSince) {
		t.Fatalf("A's term ended at %s (leading %t), B's began at %s: they overlap", aEnded, aLeading, bSince)
	}
	if bSince.Sub(cut) > ttl+2*time.Second {
		t.Errorf("failover took %s, more than session_ttl + 2s", bSince.Sub(cut))
	}

	// B expires what is due from now on; A ends nothing after B won.
	l2, _, err := b.Broker().Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "svc", TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "B to expire a lease", 30*time.Second, func() bool { return len(eventsB.ended(time.Time{})) == 1 })
	if ev := eventsB.ended(time.Time{})[0]; ev.LeaseID != l2.ID {
		t.Fatalf("B's event = %+v", ev)
	}

	// A reaches etcd again: its old fence is refused, it follows B.
	cluster.Members[0].Restart(t)
	moved, err := a.store.GetLease(ctx, l2.ID)
	if err != nil {
		t.Fatal(err)
	}
	moved.State = broker.StateActive
	_, err = a.store.UpdateLease(broker.WithFence(ctx, oldFence), moved)
	if !errors.Is(err, broker.ErrNotLeader) {
		t.Fatalf("A's write under its old fence = %v, want ErrNotLeader", err)
	}
	if got, _ := a.store.GetLease(ctx, l2.ID); got.State != broker.StateExpired {
		t.Fatalf("A's fenced write changed the lease to %s", got.State)
	}
	waitUntil(t, "A to see B leading", 30*time.Second, func() bool {
		st, err := a.store.(*etcd.Store).GroupStatus(ctx)
		return err == nil && st.Leader == "broker-b" && len(st.Members) == 2
	})
	if got := eventsA.ended(bSince); len(got) != 0 {
		t.Fatalf("A ended leases after B's election: %+v", got)
	}
	if leading(a) {
		t.Fatal("A leads again while B does")
	}
	for _, want := range []string{"leadership acquired", "leadership lost"} {
		if !strings.Contains(logsA.String(), want) {
			t.Errorf("A's log lacks %q", want)
		}
	}
	a.Close() // flushes the audit log
	if raw := readFile(t, auditA); !strings.Contains(raw, `"event":"leader"`) || !strings.Contains(raw, "no longer leads") {
		t.Errorf("A's audit log lacks the leader changes:\n%s", raw)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
