package main

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// CPU accounting for the etcd scenarios: where an operation's CPU goes,
// in the etcd members (separate processes) and in this process (the
// brokers and the load generator). On a machine whose cores are shared
// by everything, CPU per operation, not latency, is what bounds the
// throughput.

// clockTick is the unit of /proc/<pid>/stat's utime and stime (USER_HZ,
// 100 on Linux).
const clockTick = 10 * time.Millisecond

// procCPU is the user plus system CPU a process has used; 0 when unknown.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')') // the command may hold spaces
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 { // utime and stime are fields 14 and 15, 12 and 13 here
		return 0
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return time.Duration(u+st) * clockTick
}

// selfCPU is this process's user plus system CPU.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuMeter sums the CPU of the etcd members and of this process over
// the phases it measures.
type cpuMeter struct {
	members []*etcdcluster.Member
	etcd    time.Duration
	self    time.Duration
}

func (m *cpuMeter) membersCPU() time.Duration {
	var d time.Duration
	for _, mb := range m.members {
		if pid := mb.Pid(); pid != 0 {
			d += procCPU(pid)
		}
	}
	return d
}

// measure runs phase and adds the CPU used meanwhile.
func (m *cpuMeter) measure(phase func() result) result {
	e0, s0 := m.membersCPU(), selfCPU()
	r := phase()
	m.etcd += m.membersCPU() - e0
	m.self += selfCPU() - s0
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
	}
}
