package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// failoverMarker is the failover group's marker role (a group owns its
// marker role; the bench's own broker owns the default one).
const failoverMarker = "credbroker_bench_failover"

const failoverPrefix = "/credbroker-bench-failover/"

// failoverLeaseTTL is the TTL of the leases issued just before each kill:
// they expire while the group has no leader.
const failoverLeaseTTL = 2 * time.Second

// failoverInstance is one brokerd process of the failover group.
type failoverInstance struct {
	name, addr, cfg string
	cmd             *exec.Cmd
	exited          chan struct{} // closed when cmd has exited
	conn            *grpc.ClientConn
}

// runFailover measures what a crash of the leader costs a broker group:
// two brokerd processes on one etcd prefix (three members, fsync on), and
// --failover-kills times: find the leader, kill -9 it, and time from the
// kill to (a) the first successful IssueCredential on the other instance,
// issued in a closed loop from the moment of the kill, and (b) the other
// instance leading (the group's status in etcd names it), and (c) how
// late the leases issued just before the kill, expiring while no instance
// leads, are revoked (their users gone from pg_roles). The killed
// instance is then started again, as a follower, before the next kill.
func (e *env) runFailover(ctx context.Context, rep *report) error {
	cluster, err := etcdcluster.Start(ctx, etcdcluster.Options{Bin: e.opts.etcdBin})
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	defer cluster.Stop()
	status, err := etcd.Open(ctx, etcd.Options{Endpoints: cluster.Endpoints(), Prefix: failoverPrefix, DialTimeout: 30 * time.Second})
	if err != nil {
		return err
	}
	defer status.Close()

	var ins []*failoverInstance
	defer func() {
		for _, in := range ins {
			in.stop()
		}
	}()
	for _, name := range []string{"bench-a", "bench-b"} {
		in, err := e.newFailoverInstance(name, cluster.Endpoints())
		if err != nil {
			return err
		}
		ins = append(ins, in)
		if err := in.start(ctx, e.opts.brokerd); err != nil {
			return err
		}
	}
	leader := func(ctx context.Context) (string, error) {
		st, err := status.GroupStatus(ctx)
		return st.Leader, err
	}
	// A brokerd that does not campaign registers no member: say so at
	// once rather than wait for a leader that never comes.
	if st, err := status.GroupStatus(ctx); err != nil || len(st.Members) == 0 {
		return fmt.Errorf("the instances registered no member in the group's status (%v): this brokerd does not take part in a leader election", err)
	}
	// The first leader: either instance, within a generous bound.
	if _, err := waitFor(ctx, 2*time.Minute, func(ctx context.Context) (bool, error) {
		l, err := leader(ctx)
		return l != "", err
	}); err != nil {
		return fmt.Errorf("no leader elected: %w", err)
	}

	var issueGap, takeover, lags []time.Duration
	var issued []string
	ttl := e.opts.failoverTTL
	for k := range e.opts.failoverKills {
		name, err := leader(ctx)
		if err != nil || name == "" {
			return fmt.Errorf("kill %d: no leader to kill (%q, %v)", k+1, name, err)
		}
		var victim, survivor *failoverInstance
		for _, in := range ins {
			if in.name == name {
				victim = in
			} else {
				survivor = in
			}
		}
		if victim == nil || survivor == nil {
			return fmt.Errorf("kill %d: the leader %q is not one of the bench's instances", k+1, name)
		}
		cred := pb.NewCredentialServiceClient(survivor.conn)
		// Leases that expire while the group has no leader: the new one
		// must revoke them, late by at most the takeover.
		expiring := map[string]time.Time{}
		for range e.opts.failoverExpiring {
			resp, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: e.role, Ttl: durationpb.New(failoverLeaseTTL)})
			if err != nil {
				return fmt.Errorf("kill %d: issue an expiring lease: %w", k+1, err)
			}
			expiring[resp.GetLease().GetUsername()] = resp.GetLease().GetExpireTime().AsTime()
		}
		gone := make(chan map[string]time.Time, 1)
		go func() {
			g, err := e.watchGone(ctx, expiring, time.Now().Add(failoverLeaseTTL+ttl+2*time.Minute))
			if err != nil {
				rep.note("failover: watching expiring users: %v", err)
			}
			gone <- g
		}()
		t0 := time.Now()
		if err := victim.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			return err
		}
		// (a) the first issue the survivor answers after the kill.
		gapDone := make(chan error, 1)
		var gap time.Duration
		go func() {
			_, err := waitFor(ctx, ttl+time.Minute, func(ctx context.Context) (bool, error) {
				resp, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: e.role})
				if err != nil {
					return false, nil // retried until the deadline
				}
				gap = time.Since(t0)
				issued = append(issued, resp.GetLease().GetId())
				return true, nil
			})
			gapDone <- err
		}()
		// (b) the survivor leads.
		_, err = waitFor(ctx, ttl+time.Minute, func(ctx context.Context) (bool, error) {
			l, err := leader(ctx)
			return l == survivor.name, err
		})
		lead := time.Since(t0)
		if gerr := <-gapDone; gerr != nil {
			return fmt.Errorf("kill %d: no issue succeeded on %s: %w", k+1, survivor.name, gerr)
		}
		if err != nil {
			return fmt.Errorf("kill %d: %s did not take over: %w", k+1, survivor.name, err)
		}
		issueGap, takeover = append(issueGap, gap), append(takeover, lead)
		g := <-gone
		if len(g) < len(expiring) {
			rep.note("failover %d: %d of %d expired users were never dropped", k+1, len(expiring)-len(g), len(expiring))
		}
		for u, at := range g {
			lags = append(lags, at.Sub(expiring[u]))
		}
		fmt.Fprintf(os.Stderr, "  failover %d/%d: killed %s; first issue on %s after %s, leads after %s\n",
			k+1, e.opts.failoverKills, victim.name, survivor.name, fmtDur(gap), fmtDur(lead))
		<-victim.exited
		if err := victim.start(ctx, e.opts.brokerd); err != nil {
			return fmt.Errorf("restart %s: %w", victim.name, err)
		}
	}
	if len(issued) > 0 {
		if _, err := pb.NewAdminServiceClient(ins[0].conn).RevokeLeases(ctx, &pb.RevokeLeasesRequest{LeaseIds: issued}); err != nil {
			rep.note("failover cleanup: %v", err)
		}
	}
	sc := fmt.Sprintf("failover ×%d, session_ttl %s", len(takeover), ttl)
	bound := ttl + 2*time.Second
	rep.add(row{scenario: sc, figure: "kill -9 leader → other instance leads, p50 / max",
		broker: fmtDur(percentile(takeover, 50)) + " / " + fmtDur(percentile(takeover, 100)),
		target: "max ≤ " + fmtDur(bound), met: verdict(percentile(takeover, 100) <= bound)})
	rep.add(row{scenario: sc, figure: "kill -9 leader → first issue on the other, p50 / max",
		broker: fmtDur(percentile(issueGap, 50)) + " / " + fmtDur(percentile(issueGap, 100)),
		target: "max ≤ " + fmtDur(bound), met: verdict(percentile(issueGap, 100) <= bound)})
	if len(lags) > 0 {
		rep.add(row{scenario: sc, figure: fmt.Sprintf("expiry lag of %d leases expiring during each failover, p50 / max", e.opts.failoverExpiring),
			broker: fmtDur(percentile(lags, 50)) + " / " + fmtDur(percentile(lags, 100)),
			target: "max ≤ " + fmtDur(bound), met: verdict(percentile(lags, 100) <= bound)})
	}
	rep.note("failover rows: two brokerd processes on one etcd prefix (3 members on loopback, fsync on); the leader is killed with SIGKILL and started again as a follower before the next kill; no baseline")
	return nil
}

// waitFor calls cond until it reports true or fails, or timeout passes.
// cond's context is bounded per call, so a call against a dead server
// gives up and the loop tries again.
func waitFor(ctx context.Context, timeout time.Duration, cond func(context.Context) (bool, error)) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		attempt, stop := context.WithTimeout(ctx, 2*time.Second)
		ok, err := cond(attempt)
		stop()
		if ok {
			return time.Since(start), nil
		}
		if err != nil {
			last = err
		}
		// Each call is a round trip to a server (etcd, brokerd), which
		// paces the loop; a short pause keeps a refused connection from
		// spinning.
		select {
		case <-ctx.Done():
		case <-time.After(5 * time.Millisecond):
		}
	}
	if last != nil {
		return 0, fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
	}
	return 0, ctx.Err()
}

// newFailoverInstance writes the instance's configuration: the bench's
// target and role, on the failover prefix, with its own marker role.
func (e *env) newFailoverInstance(name string, endpoints []string) (*failoverInstance, error) {
	dir := filepath.Join(e.tmp, "failover-"+name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	unused := filepath.Join(dir, "unused.db")
	cfgFile, err := e.writeConfig(dir, addr, unused, "log: {level: warn}\n")
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(cfgFile)
	if err != nil {
		return nil, err
	}
	yml := string(raw)
	storeLine := "store:\n  path: " + unused + "\n"
	if !strings.Contains(yml, storeLine) {
		return nil, errors.New("bench configuration: no store.path line to replace")
	}
	yml = strings.Replace(yml, storeLine, fmt.Sprintf("instance: %s\nstore:\n  etcd:\n    endpoints: [%s]\n    prefix: %s\n    session_ttl: %s\n",
		name, strings.Join(endpoints, ", "), failoverPrefix, e.opts.failoverTTL), 1)
	yml = strings.Replace(yml, "marker_role: "+e.markerRole+"\n", "marker_role: "+failoverMarker+"\n", 1)
	if err := os.WriteFile(cfgFile, []byte(yml), 0o600); err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	return &failoverInstance{name: name, addr: addr, cfg: cfgFile, conn: conn}, nil
}

// start runs the instance (brokerd, or this binary's copy of its start
// path) and waits until it serves.
func (in *failoverInstance) start(ctx context.Context, brokerd string) error {
	if brokerd != "" {
		in.cmd = exec.Command(brokerd, "--config", in.cfg)
	} else {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		in.cmd = exec.Command(self, serveChildCmd, "--config", in.cfg)
	}
	in.cmd.Stderr = os.Stderr
	in.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := in.cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	in.exited = exited
	cmd := in.cmd
	go func() { _ = cmd.Wait(); close(exited) }()
	health := healthpb.NewHealthClient(in.conn)
	_, err := waitFor(ctx, 2*time.Minute, func(ctx context.Context) (bool, error) {
		select {
		case <-exited:
			return false, fmt.Errorf("%s exited while starting", in.name)
		default:
		}
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING, nil
	})
	return err
}

func (in *failoverInstance) stop() {
	if in.cmd != nil {
		_ = in.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-in.exited:
		case <-time.After(30 * time.Second):
			_ = in.cmd.Process.Kill()
			<-in.exited
		}
	}
	_ = in.conn.Close()
}
