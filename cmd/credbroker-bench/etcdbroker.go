package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// etcdBenchMarker is the etcd broker's marker role: a broker group owns
// its marker role, and the bbolt broker's group owns the default one.
const etcdBenchMarker = "credbroker_bench_etcd"

// runEtcdBroker measures IssueCredential and RenewLease through a broker
// on the etcd store against the bench's broker on bbolt, at
// --etcd-clients, in the same run against the same PostgreSQL: the cost a
// service sees of its broker surviving a machine. Both brokers are in
// this process, started by package daemon from a configuration (the etcd
// one with store.etcd on a three-member cluster of separate processes,
// fsync on); phases alternate between them.
func (e *env) runEtcdBroker(ctx context.Context, rep *report) error {
	if e.daemon == nil {
		return errors.New("needs the bench's own broker (not --broker)")
	}
	cluster, err := etcdcluster.Start(ctx, etcdcluster.Options{Bin: e.opts.etcdBin})
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	defer cluster.Stop()

	dir := filepath.Join(e.tmp, "etcd-broker")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	cfgFile, err := e.writeConfig(dir, "127.0.0.1:0", filepath.Join(dir, "unused.db"),
		fmt.Sprintf("expiry: {revoke_concurrency: %d, revoke_rate: %g}\n", e.revokeConcurrency(), e.revokeRate()))
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(cfgFile)
	if err != nil {
		return err
	}
	// The same configuration but the store and the marker role.
	yml := string(raw)
	storeLine := "store:\n  path: " + filepath.Join(dir, "unused.db") + "\n"
	if !strings.Contains(yml, storeLine) {
		return errors.New("bench configuration: no store.path line to replace")
	}
	yml = strings.Replace(yml, storeLine, fmt.Sprintf("instance: bench-etcd\nstore:\n  etcd:\n    endpoints: [%s]\n    prefix: /credbroker-bench-broker/\n",
		strings.Join(cluster.Endpoints(), ", ")), 1)
	yml = strings.Replace(yml, "marker_role: "+e.markerRole+"\n", "marker_role: "+etcdBenchMarker+"\n", 1)
	if err := os.WriteFile(cfgFile, []byte(yml), 0o600); err != nil {
		return err
	}
	f, err := config.Load(cfgFile)
	if err != nil {
		return err
	}
	cfg, err := f.Validate()
	if err != nil {
		return err
	}
	d, err := daemon.Start(ctx, cfg, daemon.Options{Logger: e.log, MaxStreamLeases: 1 << 20, SkipPrivilegeCheck: true})
	if err != nil {
		return fmt.Errorf("start the etcd broker: %w", err)
	}
	serveCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	served := make(chan error, 1)
	go func() { served <- d.Serve(serveCtx) }()
	defer func() {
		stop()
		<-served
		_ = d.Close()
	}()
	<-d.Ready()
	conn, err := grpc.NewClient(d.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	etcdCred, etcdAdmin := pb.NewCredentialServiceClient(conn), pb.NewAdminServiceClient(conn)

	c, per := e.opts.etcdClients, e.opts.renewPerWorker
	var issuedB, issuedE collector
	issue := func(cred pb.CredentialServiceClient, ids *collector) func(context.Context, int, int) error {
		return func(ctx context.Context, _, _ int) error {
			resp, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: e.role})
			if err != nil {
				return err
			}
			ids.add(resp.GetLease().GetId())
			return nil
		}
	}
	renewSet := func(cred pb.CredentialServiceClient, ids *collector) ([]string, error) {
		for range c * per {
			if err := issue(cred, ids)(ctx, 0, 0); err != nil {
				return nil, err
			}
		}
		return ids.take(), nil
	}
	renew := func(cred pb.CredentialServiceClient, leases []string) func(context.Context, int, int) error {
		return func(ctx context.Context, w, k int) error {
			_, err := cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: leases[w*per+k%per]})
			return err
		}
	}
	revokeAll := func(admin pb.AdminServiceClient, ids []string) {
		for _, part := range chunks(ids, (len(ids)+499)/500) {
			if _, err := admin.RevokeLeases(ctx, &pb.RevokeLeasesRequest{LeaseIds: part}); err != nil {
				rep.note("etcd broker cleanup: %v", err)
				return
			}
		}
	}
	leasesB, err := renewSet(e.cred, &issuedB)
	if err != nil {
		return fmt.Errorf("bbolt broker: %w", err)
	}
	defer revokeAll(e.adminC, leasesB)
	leasesE, err := renewSet(etcdCred, &issuedE)
	if err != nil {
		return fmt.Errorf("etcd broker: %w", err)
	}
	defer revokeAll(etcdAdmin, leasesE)

	for _, sc := range []struct {
		name     string
		etcd, bb func(context.Context, int, int) error
		after    func()
	}{
		{"issue", issue(etcdCred, &issuedE), issue(e.cred, &issuedB), func() {
			revokeAll(etcdAdmin, issuedE.take())
			revokeAll(e.adminC, issuedB.take())
		}},
		{"renew (unary)", renew(etcdCred, leasesE), renew(e.cred, leasesB), func() {}},
	} {
		var re, rb result
		me, mb := &cpuMeter{members: cluster.Members}, &cpuMeter{members: cluster.Members}
		runE := func() result { return closedLoop(ctx, c, e.opts.phase, sc.etcd) }
		runB := func() result { return closedLoop(ctx, c, e.opts.phase, sc.bb) }
		for r := range e.opts.rounds {
			if r%2 == 0 {
				rb.merge(mb.measure(runB))
				re.merge(me.measure(runE))
			} else {
				re.merge(me.measure(runE))
				rb.merge(mb.measure(runB))
			}
		}
		sc.after()
		name := fmt.Sprintf("etcd broker %s c=%d", sc.name, c)
		errNote(rep, name+" etcd", re)
		errNote(rep, name+" bbolt", rb)
		tput := row{scenario: name, figure: "throughput (etcd vs bbolt broker)", broker: fmtRate(re.perSec()), baseline: fmtRate(rb.perSec()),
			ratio: ratio(re.perSec(), rb.perSec())}
		if c == 16 {
			tput.target, tput.met = "≥ 0.80", verdict(re.perSec() >= 0.8*rb.perSec())
		}
		rep.add(tput)
		rep.add(latencyRow(name, "latency p50 (etcd vs bbolt broker)", re.pct(50), rb.pct(50)))
		rep.add(latencyRow(name, "latency p99 (etcd vs bbolt broker)", re.pct(99), rb.pct(99)))
		for _, r := range cpuRows(name, re, rb, me, mb) {
			rep.add(r)
		}
	}
	rep.note("etcd broker rows: the broker column is a broker on the etcd store (%d members on loopback, fsync on), the baseline column the bench's broker on bbolt (fsync on); both in this process, same PostgreSQL, gRPC over loopback", len(cluster.Members))
	return nil
}
