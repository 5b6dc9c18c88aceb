package etcd_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/storetest"
)

func newLeadership(t *testing.T, s *etcd.Store, name string, ttl time.Duration) *etcd.Leadership {
	t.Helper()
	l, err := etcd.NewLeadership(t.Context(), s, etcd.LeadershipOptions{
		Member:     etcd.Member{Name: name, Address: name + ":7450", Version: "test", StartTime: time.Now()},
		SessionTTL: ttl,
	})
	if err != nil {
		t.Fatalf("NewLeadership(%s): %v", name, err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

type campaignResult struct {
	term broker.Term
	err  error
}

func campaign(ctx context.Context, l *etcd.Leadership) <-chan campaignResult {
	ch := make(chan campaignResult, 1)
	go func() {
		term, err := l.Campaign(ctx)
		ch <- campaignResult{term, err}
	}()
	return ch
}

// TestLeadershipFencesTheDeposedLeader: of two members of a group one
// leads; GroupStatus shows both and the leader. When the leader's session
// ends, its term's Done closes, the other member is elected, and a write
// under the old term's fence fails with ErrNotLeader and changes nothing,
// while one under the new fence commits.
func TestLeadershipFencesTheDeposedLeader(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	sa, sb := openAt(t, eps, prefix), openAt(t, eps, prefix)
	la := newLeadership(t, sa, "broker-a", 2*time.Second)
	lb := newLeadership(t, sb, "broker-b", 2*time.Second)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()

	ra := <-campaign(ctx, la)
	if ra.err != nil {
		t.Fatal(ra.err)
	}
	termA := ra.term
	bWon := campaign(ctx, lb)

	st, err := sa.GroupStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Members) != 2 || st.Members[0].Name != "broker-a" || st.Members[1].Name != "broker-b" || st.Leader != "broker-a" || st.LeaderSince.IsZero() {
		t.Fatalf("status = %+v, want members broker-a and broker-b, broker-a leading", st)
	}
	if st.Members[0].Address != "broker-a:7450" || st.Members[0].Run != "" {
		t.Errorf("member = %+v (the run id is internal)", st.Members[0])
	}
	if err := termA.Confirm(ctx); err != nil {
		t.Fatalf("Confirm of the leading term: %v", err)
	}

	// A's writes under its fence commit while it leads.
	fenceA := broker.WithFence(ctx, termA.Fence())
	l := storetest.NewLease("lease-1", "ro", "svc", time.Now())
	if err := sa.CreateLease(fenceA, &l); err != nil {
		t.Fatalf("fenced create while leading: %v", err)
	}

	// A's session ends (Close revokes its lease, as a crash would let it
	// expire).
	if err := la.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-termA.Done():
	case <-ctx.Done():
		t.Fatal("term A did not end with its session")
	}
	var rb campaignResult
	select {
	case rb = <-bWon:
	case <-ctx.Done():
		t.Fatal("B was not elected")
	}
	if rb.err != nil {
		t.Fatal(rb.err)
	}
	if rb.term.Fence() == termA.Fence() {
		t.Fatal("the new term has the old fence")
	}
	if err := termA.Confirm(ctx); !errors.Is(err, broker.ErrNotLeader) {
		t.Errorf("Confirm of the old term = %v, want ErrNotLeader", err)
	}

	// A deposed leader's write fails, with a clear error, and changes
	// nothing.
	moved := l
	moved.ExpireTime = l.ExpireTime.Add(time.Hour)
	_, err = sa.UpdateLease(fenceA, moved)
	if !errors.Is(err, broker.ErrNotLeader) || !strings.Contains(err.Error(), "leadership term") {
		t.Fatalf("write under the old fence = %v, want ErrNotLeader", err)
	}
	got, err := sa.GetLease(ctx, l.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !got.ExpireTime.Equal(l.ExpireTime) {
		t.Fatalf("the deposed leader's write changed the lease: expire %s", got.ExpireTime)
	}
	if err := sa.DeleteIntent(fenceA, "x"); !errors.Is(err, broker.ErrNotLeader) {
		t.Errorf("DeleteIntent under the old fence = %v", err)
	}
	dead := storetest.NewLease("lease-2", "ro", "svc", time.Now().Add(-2*time.Hour))
	dead.State, dead.EndTime = broker.StateRevoked, time.Now().Add(-time.Hour)
	if err := sa.CreateLease(ctx, &dead); err != nil {
		t.Fatal(err)
	}
	if _, err := sa.PurgeTombstones(fenceA, time.Now(), 10); !errors.Is(err, broker.ErrNotLeader) {
		t.Errorf("PurgeTombstones under the old fence = %v, want ErrNotLeader", err)
	}
	if _, err := sa.GetLease(ctx, dead.ID); err != nil {
		t.Errorf("the deposed leader's purge deleted a tombstone: %v", err)
	}
	// B's fence works.
	if _, err := sb.UpdateLease(broker.WithFence(ctx, rb.term.Fence()), moved); err != nil {
		t.Fatalf("write under the new fence: %v", err)
	}
	st, err = sb.GroupStatus(ctx)
	if err != nil || st.Leader != "broker-b" || len(st.Members) != 1 {
		t.Fatalf("status after A left: %+v, %v", st, err)
	}

	// Resign hands over at once.
	if err := rb.term.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := sb.GroupStatus(ctx); st.Leader != "" {
		t.Errorf("leader after resigning: %q", st.Leader)
	}
}

// TestLeadershipRefusesATakenInstanceName: a second member of the same
// name is refused once the first has held it for a whole session TTL,
// naming the fix; the name is free again once the first leaves.
func TestLeadershipRefusesATakenInstanceName(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	sa, sb := openAt(t, eps, prefix), openAt(t, eps, prefix)
	la := newLeadership(t, sa, "broker-a", 2*time.Second)
	_, err := etcd.NewLeadership(t.Context(), sb, etcd.LeadershipOptions{Member: etcd.Member{Name: "broker-a"}, SessionTTL: 2 * time.Second})
	if !errors.Is(err, broker.ErrExists) || !strings.Contains(err.Error(), "give each brokerd its own `instance`") {
		t.Fatalf("second broker-a: %v", err)
	}
	_ = la.Close()
	newLeadership(t, sb, "broker-a", 2*time.Second)
}
