package main

import (
	"time"

	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// CPU accounting for the etcd scenarios: where an operation's CPU goes,
// in the etcd members (separate processes) and in this process (the
// brokers and the load generator). On a machine whose cores are shared
// by everything, CPU per operation, not latency, is what bounds the
// throughput.

// cpuMeter sums the CPU of the etcd members and of this process over
// the phases it measures.
type cpuMeter struct {
	members []*etcdcluster.Member
	etcd    time.Duration
	self    time.Duration
	reqs    etcdCounts // what the phases asked of etcd (etcdmetrics.go)
}

func (m *cpuMeter) membersCPU() time.Duration {
	var d time.Duration
	for _, mb := range m.members {
		if pid := mb.Pid(); pid != 0 {
			if c, err := procCPU(pid); err == nil { // procCPU: child.go
				d += c
			}
		}
	}
	return d
}

// measure runs phase and adds the CPU used meanwhile.
func (m *cpuMeter) measure(phase func() result) result {
	q0 := scrapeMembers(m.members)
	e0, s0 := m.membersCPU(), selfCPU()
	r := phase()
	m.etcd += m.membersCPU() - e0
	m.self += selfCPU() - s0
	d := scrapeMembers(m.members).minus(q0)
	m.reqs = etcdCounts{txn: m.reqs.txn + d.txn, rng: m.reqs.rng + d.rng, puts: m.reqs.puts + d.puts, members: d.members}
	return r
}

// perOp formats CPU per operation.
func perOp(d time.Duration, ops int) string {
	if ops == 0 {
		return "-"
	}
	return fmtDur(d / time.Duration(ops))
}

// cpuRows report CPU per operation of the etcd phases (re, me) against
// the bbolt ones (rb, mb): in the etcd members (0 in the bbolt phases
// but for their idle heartbeats), and in this process.
func cpuRows(scenario string, re, rb result, me, mb *cpuMeter) []row {
	return []row{
		{scenario: scenario, figure: "CPU per op in the etcd members (etcd vs bbolt phases)",
			broker: perOp(me.etcd, re.ops), baseline: perOp(mb.etcd, rb.ops)},
		{scenario: scenario, figure: "CPU per op in this process (etcd vs bbolt phases)",
			broker: perOp(me.self, re.ops), baseline: perOp(mb.self, rb.ops),
			ratio: ratio(float64(me.self)/float64(max(re.ops, 1)), float64(mb.self)/float64(max(rb.ops, 1)))},
		{scenario: scenario, figure: "etcd requests per op (all members; keys put per member)",
			broker: me.reqs.perOp(re.ops), baseline: "-"},
	}
}
