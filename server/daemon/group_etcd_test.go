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

	"github.com/jackc/pgx/v5"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
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
		if ev.Remote {
			// Another instance's work (or this one's, reported again by
			// the change feed): the tests count what each instance did.
			return
		}
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

// followerMember returns the index of an endpoint whose member is not
// etcd's raft leader.
func followerMember(t *testing.T, ctx context.Context, eps []string) int {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	for i, ep := range eps {
		st, err := cli.Status(ctx, ep)
		if err != nil {
			t.Fatal(err)
		}
		if st.Header.MemberId != st.Leader {
			return i
		}
	}
	t.Fatal("every member says it leads")
	return 0
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
// dies, A is cut off: its term ends before B's begins (the keep-alive
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
	// A talks to one member that is not etcd's raft leader, B to the other
	// two. Killing etcd's leader would add etcd's own election and its
	// lease extension (a new raft leader renews every lease by its TTL) to
	// the failover: that is etcd's, and docs/ha.md states it; this test
	// measures the broker's part.
	cut := followerMember(t, ctx, eps)
	var epsB []string
	for i, ep := range eps {
		if i != cut {
			epsB = append(epsB, ep)
		}
	}

	var logsA syncbuf.Buffer
	optsA := testOptions()
	optsA.Logger = slog.New(slog.NewTextHandler(&logsA, nil))
	auditA := t.TempDir() + "/audit.log"
	a, err := Start(ctx, etcdConfig(t, tg, eps[cut:cut+1], "/group/", "broker-a", ttl, "", "audit: {path: "+auditA+"}\n"), optsA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	eventsA := watchLifecycle(a.Broker())
	waitUntil(t, "A to lead", 30*time.Second, func() bool { return leading(a) })

	var logsB syncbuf.Buffer
	optsB := testOptions()
	optsB.Logger = slog.New(slog.NewTextHandler(&logsB, nil))
	b, err := Start(ctx, etcdConfig(t, tg, epsB, "/group/", "broker-b", ttl, "", ""), optsB)
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
	cutAt := time.Now()
	cluster.Members[cut].Kill()
	waitUntil(t, "B to lead", ttl+2*time.Second+10*time.Second /* load */, func() bool { return leading(b) })
	_, bSince := b.leader.Leading()
	t.Logf("B leads %s after the cut (session_ttl %s)", bSince.Sub(cutAt).Round(time.Millisecond), ttl)
	aLeading, _ := a.leader.Leading()
	a.leader.mu.Lock()
	aEnded, oldFence := a.leader.ended, a.leader.fence
	a.leader.mu.Unlock()
	if aLeading || aEnded.IsZero() || !aEnded.Before(bSince) {
		t.Fatalf("A's term ended at %s (leading %t), B's began at %s: they overlap", aEnded, aLeading, bSince)
	}
	if bSince.Sub(cutAt) > ttl+2*time.Second {
		t.Errorf("failover took %s, more than session_ttl + 2s", bSince.Sub(cutAt))
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
	cluster.Members[cut].Restart(t)
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

	// B, the leader, shuts down: it hands the lead over, which is no loss.
	b.Close()
	if logs := logsB.String(); !strings.Contains(logs, "leadership handed over at shutdown") || strings.Contains(logs, "leadership lost") {
		t.Errorf("B's log at shutdown, want a hand-over and no loss:\n%s", logs)
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

// TestIssueWithoutQuorumIsUnavailable: with one of three etcd members
// down (not etcd's leader) issue and renew go on; with two down,
// IssueCredential answers Unavailable (not Internal) and returns no
// credential; once quorum is back, issues work again and, after the
// reconciler's two sweeps, no user is left without a lease.
func TestIssueWithoutQuorumIsUnavailable(t *testing.T) {
	const ttl = 2 * time.Second
	cluster := etcdtest.StartCluster(t, 3)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var logs syncbuf.Buffer
	opts := testOptions()
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	defer func() {
		if t.Failed() {
			t.Logf("brokerd's log:\n%s", logs.String())
		}
	}()
	d, err := Start(ctx, etcdConfig(t, tg, cluster.Endpoints(), "/quorum/", "broker-a", ttl, "", "reconcile_interval: 1s\n"), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	go func() { _ = d.Serve(ctx) }()
	<-d.Ready()
	conn, err := grpc.NewClient(d.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := pb.NewCredentialServiceClient(conn)
	if _, err := client.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "read_only"}); err != nil {
		t.Fatal(err)
	}

	// One member down: the other two are a quorum; only latency changes.
	down := followerMember(t, ctx, cluster.Endpoints())
	cluster.Members[down].Kill()
	for range 3 {
		resp, err := client.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "read_only"})
		if err != nil {
			t.Fatalf("issue with one member of three down: %v", err)
		}
		if _, err := client.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: resp.GetLease().GetId()}); err != nil {
			t.Fatalf("renew with one member of three down: %v", err)
		}
	}

	second := (down + 1) % len(cluster.Members)
	cluster.Members[second].Kill()
	for range 3 {
		cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
		resp, err := client.IssueCredential(cctx, &pb.IssueCredentialRequest{Role: "read_only"})
		ccancel()
		if status.Code(err) != codes.Unavailable || resp.GetCredential() != nil {
			t.Fatalf("issue without quorum: %v (credential %v), want Unavailable and none", err, resp.GetCredential() != nil)
		}
	}

	cluster.Members[down].Restart(t)
	cluster.Members[second].Restart(t)
	var lease *pb.Lease
	waitUntil(t, "issues to work again", 60*time.Second, func() bool {
		resp, err := client.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "read_only"})
		lease = resp.GetLease()
		return err == nil
	})
	waitUntil(t, "the reconciler to drop the users of the failed issues", 60*time.Second, func() bool {
		var live map[string]bool = map[string]bool{}
		leases, _, err := d.Broker().ListLeases(ctx, broker.LeaseFilter{})
		if err != nil {
			return false
		}
		for _, l := range leases {
			if l.State.Live() {
				live[l.Username] = true
			}
		}
		members := markerMembers(t, tg)
		for _, u := range members {
			if !live[u] {
				return false
			}
		}
		return len(members) == len(live) && live[lease.GetUsername()]
	})
}

// markerMembers lists, as superuser, the members of the target's marker
// role that are issued users (not the admin, who holds ADMIN OPTION).
func markerMembers(t *testing.T, tg *pgtest.Target) []string {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(context.Background(), `SELECT m.rolname FROM pg_auth_members am
		JOIN pg_roles r ON r.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
		WHERE r.rolname = $1 AND NOT am.admin_option`, tg.MarkerRole)
	if err != nil {
		t.Fatal(err)
	}
	users, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return users
}

// TestIsLeaderFollowsTheElection: credbroker_is_leader is 1 on the
// leading instance and 0 on the other; /readyz is 200 on both (the group
// has a leader); the follower refuses a root rotation, naming the leader;
// when the leader stops, the other's gauge turns 1.
func TestIsLeaderFollowsTheElection(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 1)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := func(name string) (*Daemon, context.CancelFunc) {
		d, err := Start(ctx, etcdConfig(t, tg, cluster.Endpoints(), "/metrics/", name, 2*time.Second, "", "metrics: {listen: 127.0.0.1:0}\n"), testOptions())
		if err != nil {
			t.Fatal(err)
		}
		sctx, stop := context.WithCancel(ctx)
		served := make(chan struct{})
		go func() { _ = d.Serve(sctx); close(served) }()
		<-d.Ready()
		t.Cleanup(func() { stop(); <-served; d.Close() })
		return d, func() { stop(); <-served; d.Close() }
	}
	a, stopA := start("broker-a")
	waitUntil(t, "A to lead", 30*time.Second, func() bool { return leading(a) })
	b, _ := start("broker-b")
	if got := scrapeMetrics(t, a)["credbroker_is_leader"]; got != 1 {
		t.Errorf("credbroker_is_leader on the leader = %v", got)
	}
	if got := scrapeMetrics(t, b)["credbroker_is_leader"]; got != 0 {
		t.Errorf("credbroker_is_leader on the follower = %v", got)
	}
	for _, d := range []*Daemon{a, b} {
		if code, body := httpGet(t, d, "/readyz"); code != 200 {
			t.Errorf("/readyz = %d %s", code, body)
		}
	}
	// Root rotation is the leader's: the follower refuses it, naming the
	// leader.
	if _, err := b.rootRotator().RotateRoot(ctx, "main"); !errors.Is(err, broker.ErrNotLeader) || !strings.Contains(err.Error(), "instance broker-a at "+a.Addr().String()) {
		t.Errorf("rotation on the follower: %v", err)
	}
	stopA()
	waitUntil(t, "B's gauge to turn 1", 30*time.Second, func() bool { return scrapeMetrics(t, b)["credbroker_is_leader"] == 1 })
	if code, body := httpGet(t, b, "/readyz"); code != 200 {
		t.Errorf("/readyz on the new leader = %d %s", code, body)
	}
}
