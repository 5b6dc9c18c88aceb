package main

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// runEtcdStore measures the lease store's share of issue and renew on
// etcd against bbolt, in the same run at the same concurrency: the ratio
// says what a broker group on etcd gives up for surviving a machine. The
// etcd side is a three-member cluster of separate processes on loopback
// (fsync on, as bbolt's), the bbolt side a file in the bench's directory
// (fsync on, group commit). Per operation:
//
//   - issue: PutIntent, then CreateLease (what the broker writes around
//     CREATE ROLE);
//   - renew: GetLease, then UpdateLeases of that one lease (what a
//     renewal writes when no other renewal shares its batch).
//
// Phases alternate between the stores in --rounds rounds. PostgreSQL is
// not involved: through the broker the store is a smaller share of an
// issue (CREATE ROLE dominates), so the broker-level ratio can only be
// closer to 1 than this one.
func (e *env) runEtcdStore(ctx context.Context, rep *report) error {
	c := e.opts.etcdClients
	cluster, err := etcdcluster.Start(ctx, etcdcluster.Options{Bin: e.opts.etcdBin})
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	defer cluster.Stop()
	es, err := etcd.Open(ctx, etcd.Options{Endpoints: cluster.Endpoints(), Prefix: "/credbroker-bench/", DialTimeout: 30 * time.Second})
	if err != nil {
		return err
	}
	defer es.Close()
	bs, err := store.Open(filepath.Join(e.tmp, "store-bench.db"), store.Options{})
	if err != nil {
		return err
	}
	defer bs.Close()

	now := time.Now().UTC()
	newLease := func(id string) broker.Lease {
		return broker.Lease{ID: id, Role: benchRole, Client: "bench", Target: "main", Username: "u_" + id,
			ProxyRole: benchProxy, IssueTime: now, ExpireTime: now.Add(time.Hour), MaxExpireTime: now.Add(24 * time.Hour),
			State: broker.StateActive, Metadata: map[string]string{"pod": "bench"}}
	}
	issue := func(s broker.LeaseStore) func(context.Context, int, int) error {
		return func(ctx context.Context, _, _ int) error {
			id := randHex(12)
			l := newLease(id)
			if err := s.PutIntent(ctx, broker.Intent{LeaseID: id, Target: l.Target, Username: l.Username, ProxyRole: l.ProxyRole, CreateTime: now}); err != nil {
				return err
			}
			return s.CreateLease(ctx, &l)
		}
	}
	// Each client renews its own leases in turn, so renewals never
	// conflict with each other.
	perClient := e.opts.renewPerWorker
	seed := func(s broker.LeaseStore) ([]string, error) {
		ids := make([]string, c*perClient)
		for i := range ids {
			ids[i] = randHex(12)
			l := newLease(ids[i])
			if err := s.CreateLease(ctx, &l); err != nil {
				return nil, err
			}
		}
		return ids, nil
	}
	renew := func(s broker.LeaseStore, ids []string) func(context.Context, int, int) error {
		return func(ctx context.Context, w, n int) error {
			l, err := s.GetLease(ctx, ids[w*perClient+n%perClient])
			if err != nil {
				return err
			}
			l.ExpireTime = l.ExpireTime.Add(time.Millisecond)
			_, errs := s.UpdateLeases(ctx, []broker.Lease{l})
			return errs[0]
		}
	}
	eIDs, err := seed(es)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	bIDs, err := seed(bs)
	if err != nil {
		return fmt.Errorf("bbolt: %w", err)
	}

	for _, sc := range []struct {
		name     string
		etcd, bb func(context.Context, int, int) error
	}{
		{"issue", issue(es), issue(bs)},
		{"renew", renew(es, eIDs), renew(bs, bIDs)},
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
		name := fmt.Sprintf("etcd store %s c=%d", sc.name, c)
		errNote(rep, name+" etcd", re)
		errNote(rep, name+" bbolt", rb)
		row := row{scenario: name, figure: "throughput (etcd vs bbolt)", broker: fmtRate(re.perSec()), baseline: fmtRate(rb.perSec()),
			ratio: ratio(re.perSec(), rb.perSec())}
		if c == 16 {
			row.target, row.met = "≥ 0.80", verdict(re.perSec() >= 0.8*rb.perSec())
		}
		rep.add(row)
		rep.add(latencyRow(name, "latency p50 (etcd vs bbolt)", re.pct(50), rb.pct(50)))
		rep.add(latencyRow(name, "latency p99 (etcd vs bbolt)", re.pct(99), rb.pct(99)))
		for _, r := range cpuRows(name, re, rb, me, mb) {
			rep.add(r)
		}
	}
	rep.note("etcd store rows: the broker column is the etcd store (%d members on loopback, fsync on), the baseline column the bbolt store (fsync on); store calls only, no PostgreSQL", len(cluster.Members))
	return nil
}

func latencyRow(scenario, figure string, a, b time.Duration) row {
	return row{scenario: scenario, figure: figure, broker: fmtDur(a), baseline: fmtDur(b), ratio: ratio(float64(a), float64(b))}
}
