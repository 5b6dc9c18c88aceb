package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/pgtest"
	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// haInstance is one brokerd process of a group on etcd.
type haInstance struct {
	name, addr, config, audit string
}

// writeHAConfig writes the configuration of instance name of a group on
// etcd: session_ttl ttl, a 1 s reconcile interval, leases of 3 s by
// default, and an audit log.
func writeHAConfig(t *testing.T, tg *pgtest.Target, endpoints []string, name string, ttl time.Duration) haInstance {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "admin.password"), []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	in := haInstance{name: name, addr: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		config: filepath.Join(dir, "credbroker.yaml"), audit: filepath.Join(dir, "audit.log")}
	eps, _ := json.Marshal(endpoints)
	yml := fmt.Sprintf(`listen: %q
instance: %s
store:
  etcd: {endpoints: %s, prefix: /ha/, session_ttl: %s}
targets:
  - {name: main, url: %q, password_file: admin.password, marker_role: %s}
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 3s, max_ttl: 1m}
reconcile_interval: 1s
shutdown_timeout: 5s
dsn_sslmode: disable
audit: {path: %q}
`, in.addr, name, eps, ttl, tg.AdminURL, tg.MarkerRole, tg.ProxyRoles["read_only"], in.audit)
	if err := os.WriteFile(in.config, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	return in
}

// groupStatus polls GetStatus on conn until cond holds, with a deadline.
func waitStatus(t *testing.T, conn *grpc.ClientConn, what string, deadline time.Duration, cond func(*credbrokerv1.GetStatusResponse) bool) *credbrokerv1.GetStatusResponse {
	t.Helper()
	admin := credbrokerv1.NewAdminServiceClient(conn)
	end := time.Now().Add(deadline)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := admin.GetStatus(ctx, &credbrokerv1.GetStatusRequest{})
		cancel()
		if err == nil && cond(st) {
			return st
		}
		if time.Now().After(end) {
			t.Fatalf("%s: not within %s (last: %v, %v)", what, deadline, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// auditEnds counts, per lease, the records of both audit logs that end a
// lease (expire, revoke, reconcile_drop).
func auditEnds(t *testing.T, paths ...string) map[string]int {
	t.Helper()
	n := map[string]int{}
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var r struct {
				Event   string `json:"event"`
				LeaseID string `json:"lease_id"`
			}
			if json.Unmarshal(sc.Bytes(), &r) != nil {
				continue // a line cut by the kill
			}
			switch r.Event {
			case "expire", "revoke", "reconcile_drop":
				if r.LeaseID != "" {
					n[r.LeaseID]++
				}
			}
		}
		f.Close()
	}
	return n
}

// TestHAKillNineTheLeader: two brokerd processes in one group on a real
// etcd. Clients issue on the leader A and renew on both A and B; A is
// killed with SIGKILL mid-traffic, and the clients carry on with B. B
// leads within session_ttl + 2 s; every credential a client received has
// a lease; every lease ends exactly once (one terminal record in the two
// audit logs together, and a terminal state), never before the latest
// expiry its client was told, and no later after it than the failover
// took (plus a second of slack for the revocation itself); and once the
// leases are over, the marker role has no member left.
//
// Leases are issued on the leader only before the kill: a lease issued on
// a follower enters the leader's expiry queue through the store's change
// feed (branch ha-watch), not this branch.
func TestHAKillNineTheLeader(t *testing.T) {
	const ttl = 2 * time.Second
	cluster := etcdtest.StartCluster(t, 1)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	a := writeHAConfig(t, tg, cluster.Endpoints(), "broker-a", ttl)
	b := writeHAConfig(t, tg, cluster.Endpoints(), "broker-b", ttl)

	procA := startBrokerd(t, a.config)
	connA := dial(t, a.addr)
	waitServing(t, connA)
	waitStatus(t, connA, "A to lead", 30*time.Second, func(st *credbrokerv1.GetStatusResponse) bool {
		return st.GetLeader() == "broker-a" && st.GetLeaderSince() != nil
	})
	procB := startBrokerd(t, b.config)
	connB := dial(t, b.addr)
	waitServing(t, connB)
	waitStatus(t, connB, "B to join", 30*time.Second, func(st *credbrokerv1.GetStatusResponse) bool { return len(st.GetInstances()) == 2 })

	var (
		mu     sync.Mutex
		leases = map[string]*held{}
	)
	record := func(l *credbrokerv1.Lease, username string) { recordHeld(&mu, leases, l, username) }
	clientA, clientB := credbrokerv1.NewCredentialServiceClient(connA), credbrokerv1.NewCredentialServiceClient(connB)
	killed := make(chan struct{})
	ctx, stop := context.WithCancel(context.Background())
	var workers sync.WaitGroup
	for w := range 6 {
		workers.Go(func() {
			var mine []string
			for i := 0; ctx.Err() == nil; i++ {
				issuer := clientA
				select {
				case <-killed:
					issuer = clientB
				default:
				}
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				resp, err := issuer.IssueCredential(cctx, &credbrokerv1.IssueCredentialRequest{Role: "read_only"})
				cancel()
				if err == nil {
					record(resp.GetLease(), resp.GetCredential().GetUsername())
					mine = append(mine, resp.GetLease().GetId())
				}
				// Renew an earlier lease, alternately on A and on B.
				if len(mine) > 1 {
					renewer := clientA
					if (w+i)%2 == 0 {
						renewer = clientB
					}
					id := mine[(i*7)%len(mine)]
					cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					r, err := renewer.RenewLease(cctx, &credbrokerv1.RenewLeaseRequest{LeaseId: id})
					cancel()
					if err == nil {
						record(r.GetLease(), "")
					}
				}
			}
		})
	}
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(leases)
	}
	deadline := time.Now().Add(60 * time.Second)
	for count() < 40 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d credentials issued in a minute", count())
		}
		time.Sleep(20 * time.Millisecond)
	}

	kill := time.Now()
	if err := procA.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = procA.Wait()
	close(killed)
	st := waitStatus(t, connB, "B to lead", ttl+20*time.Second, func(st *credbrokerv1.GetStatusResponse) bool {
		return st.GetLeader() == "broker-b" && st.GetLeaderSince() != nil
	})
	failover := time.Since(kill)
	t.Logf("failover: B leads %s after the kill (session_ttl %s); B's term began %s after it",
		failover.Round(time.Millisecond), ttl, st.GetLeaderSince().AsTime().Sub(kill).Round(time.Millisecond))
	if failover > ttl+2*time.Second {
		t.Errorf("failover took %s, more than session_ttl + 2s", failover)
	}
	atKill := count()
	for count() < atKill+20 {
		if time.Now().After(deadline.Add(time.Minute)) {
			t.Fatalf("B issued only %d credentials after the failover", count()-atKill)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	workers.Wait()

	mu.Lock()
	defer mu.Unlock()
	settleAndCheck(t, tg, connB, leases, failover+time.Second, a.audit, b.audit)
	_ = procB.Process.Signal(syscall.SIGTERM)
	if err := procB.Wait(); err != nil {
		t.Errorf("brokerd B exit after SIGTERM: %v", err)
	}
}

// held is a credential a client received, and the latest expire_time a
// response told it.
type held struct {
	username string
	promised time.Time
}

func recordHeld(mu *sync.Mutex, leases map[string]*held, l *credbrokerv1.Lease, username string) {
	mu.Lock()
	defer mu.Unlock()
	h := leases[l.GetId()]
	if h == nil {
		h = &held{username: username}
		leases[l.GetId()] = h
	}
	if e := l.GetExpireTime().AsTime(); e.After(h.promised) {
		h.promised = e
	}
}

// settleAndCheck waits (with deadlines) until no lease is live and the
// marker role is empty, and checks that every credential handed out has a
// lease that expired exactly once (audit logs), not before its promised
// expiry and at most maxLate after it.
func settleAndCheck(t *testing.T, tg *pgtest.Target, conn *grpc.ClientConn, leases map[string]*held, maxLate time.Duration, audits ...string) {
	t.Helper()
	adminB := credbrokerv1.NewAdminServiceClient(conn)
	var stored map[string]*credbrokerv1.Lease
	end := time.Now().Add(90 * time.Second)
	for {
		stored = map[string]*credbrokerv1.Lease{}
		live := 0
		var token string
		for {
			resp, err := adminB.ListLeases(context.Background(), &credbrokerv1.ListLeasesRequest{PageSize: 1000, PageToken: token})
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range resp.GetLeases() {
				stored[l.GetId()] = l
				switch l.GetState() {
				case credbrokerv1.LeaseState_LEASE_STATE_EXPIRED, credbrokerv1.LeaseState_LEASE_STATE_REVOKED:
				default:
					live++
				}
			}
			if token = resp.GetNextPageToken(); token == "" {
				break
			}
		}
		if live == 0 {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("%d leases still live 90s after the clients stopped", live)
		}
		time.Sleep(100 * time.Millisecond)
	}
	ends := auditEnds(t, audits...)
	var worstLate time.Duration
	for id, h := range leases {
		l, ok := stored[id]
		if !ok {
			t.Errorf("credential %s was handed out but lease %s is unknown", h.username, id)
			continue
		}
		if n := ends[id]; n != 1 {
			t.Errorf("lease %s ended %d times in the audit logs, want once", id, n)
		}
		if l.GetState() != credbrokerv1.LeaseState_LEASE_STATE_EXPIRED {
			t.Errorf("lease %s is %s; nobody revoked it", id, l.GetState())
			continue
		}
		ended := l.GetEndTime().AsTime()
		if ended.Before(h.promised) {
			t.Errorf("lease %s ended at %s, before the expiry %s its client was promised", id, ended, h.promised)
		}
		if late := ended.Sub(h.promised); late > worstLate {
			worstLate = late
		}
	}
	t.Logf("%d credentials; latest revocation %s after its expiry", len(leases), worstLate.Round(time.Millisecond))
	if worstLate > maxLate {
		t.Errorf("a revocation came %s after its expiry, more than %s", worstLate, maxLate)
	}
	// After the reconciler's two sweeps, no user is left.
	end = time.Now().Add(60 * time.Second)
	for left := markerMembers(t, testConfig{target: tg}); len(left) > 0; left = markerMembers(t, testConfig{target: tg}) {
		if time.Now().After(end) {
			t.Fatalf("users left with no live lease: %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestHARollingRestartLosesNothing: two brokerd processes in one group;
// under load, each is stopped (SIGTERM) and started again in turn. The
// leader resigns as it stops, so the other takes over at once. Clients
// issue on whichever instance leads (as seen by GetStatus) and renew on
// both, retrying on the other when one is down. Nothing is lost: every
// credential handed out has a lease that expires exactly once, never
// early and at most a session TTL late (a hand-over takes well under
// one: the stopping leader resigns), and no user is left.
func TestHARollingRestartLosesNothing(t *testing.T) {
	const ttl = 2 * time.Second
	cluster := etcdtest.StartCluster(t, 1)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	ins := []haInstance{
		writeHAConfig(t, tg, cluster.Endpoints(), "broker-a", ttl),
		writeHAConfig(t, tg, cluster.Endpoints(), "broker-b", ttl),
	}
	procs := make([]*exec.Cmd, 2)
	conns := make([]*grpc.ClientConn, 2)
	for i := range ins {
		procs[i] = startBrokerd(t, ins[i].config)
		conns[i] = dial(t, ins[i].addr)
		waitServing(t, conns[i])
	}
	clients := []credbrokerv1.CredentialServiceClient{
		credbrokerv1.NewCredentialServiceClient(conns[0]), credbrokerv1.NewCredentialServiceClient(conns[1]),
	}
	var leader atomic.Int32 // index of the instance last seen leading
	ctx, stop := context.WithCancel(context.Background())
	var bg sync.WaitGroup
	bg.Go(func() {
		for ctx.Err() == nil {
			for i, c := range conns {
				cctx, cancel := context.WithTimeout(ctx, time.Second)
				st, err := credbrokerv1.NewAdminServiceClient(c).GetStatus(cctx, &credbrokerv1.GetStatusRequest{})
				cancel()
				if err == nil && st.GetLeader() == ins[i].name && st.GetLeaderSince() != nil {
					leader.Store(int32(i))
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	var (
		mu     sync.Mutex
		leases = map[string]*held{}
	)
	for w := range 6 {
		bg.Go(func() {
			var mine []string
			for i := 0; ctx.Err() == nil; i++ {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				resp, err := clients[leader.Load()].IssueCredential(cctx, &credbrokerv1.IssueCredentialRequest{Role: "read_only"})
				cancel()
				if err == nil {
					recordHeld(&mu, leases, resp.GetLease(), resp.GetCredential().GetUsername())
					mine = append(mine, resp.GetLease().GetId())
				}
				if len(mine) > 1 {
					id := mine[(i*7)%len(mine)]
					for try := range 2 {
						cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
						r, err := clients[(w+i+try)%2].RenewLease(cctx, &credbrokerv1.RenewLeaseRequest{LeaseId: id})
						cancel()
						if err == nil {
							recordHeld(&mu, leases, r.GetLease(), "")
							break
						}
					}
				}
			}
		})
	}
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(leases)
	}
	waitCount := func(n int) {
		t.Helper()
		end := time.Now().Add(90 * time.Second)
		for count() < n {
			if time.Now().After(end) {
				t.Fatalf("only %d credentials issued, want %d", count(), n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitCount(30)
	for i := range ins {
		if err := procs[i].Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := procs[i].Wait(); err != nil {
			t.Errorf("%s exit after SIGTERM: %v", ins[i].name, err)
		}
		other := 1 - i
		waitStatus(t, conns[other], ins[other].name+" to lead", 30*time.Second, func(st *credbrokerv1.GetStatusResponse) bool {
			return st.GetLeader() == ins[other].name && st.GetLeaderSince() != nil
		})
		waitCount(count() + 15)
		procs[i] = startBrokerd(t, ins[i].config)
		waitServing(t, conns[i])
		waitStatus(t, conns[other], ins[i].name+" to rejoin", 30*time.Second, func(st *credbrokerv1.GetStatusResponse) bool {
			return len(st.GetInstances()) == 2
		})
		waitCount(count() + 15)
	}
	stop()
	bg.Wait()
	mu.Lock()
	defer mu.Unlock()
	settleAndCheck(t, tg, conns[0], leases, ttl, ins[0].audit, ins[1].audit)
	for i := range procs {
		_ = procs[i].Process.Signal(syscall.SIGTERM)
		_ = procs[i].Wait()
	}
}
