package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// --pin: PostgreSQL on one half of the CPUs (CPU 0 of two), the broker and
// the bench's clients on the other, the closest one machine comes to the
// production layout where PostgreSQL has a host of its own. On shared
// cores every millisecond of CPU the broker spends per credential is taken
// from the backends doing the catalog work; pinned, it is not, and the
// ratio measures latency and serialization rather than CPU theft.
//
// The bench pins by sched_setaffinity, not by starting processes under
// taskset(1), so that one run can switch between the two modes with the
// same cluster and brokers: every thread of the bench process, every
// process of the PostgreSQL cluster (the postmaster and its children;
// backends forked later inherit the postmaster's mask) and every broker
// process the bench started are moved.

// pinModes are --pin's values: which modes the pinnable scenarios run in.
var pinModes = map[string][]bool{"off": {false}, "on": {true}, "both": {false, true}}

// pinnedScenarios are the scenarios --pin applies to: closed-loop phases
// against a baseline. The others run once, unpinned.
var pinnedScenarios = []string{"issue", "renew", "revoke"}

// cpuSplit is which CPUs PostgreSQL gets and which the rest gets when
// pinned, and all of them for unpinned.
type cpuSplit struct{ pg, rest, all []int }

func splitCPUs(cpus []int) (cpuSplit, error) {
	if len(cpus) < 2 {
		return cpuSplit{}, fmt.Errorf("--pin needs at least 2 CPUs, the bench may use %d", len(cpus))
	}
	h := len(cpus) / 2
	return cpuSplit{pg: cpus[:h], rest: cpus[h:], all: cpus}, nil
}

// allowedCPUs lists the CPUs this process may run on.
func allowedCPUs() ([]int, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return nil, err
	}
	var out []int
	for i := 0; i < len(set)*64 && len(out) < set.Count(); i++ {
		if set.IsSet(i) {
			out = append(out, i)
		}
	}
	return out, nil
}

func fmtCPUs(cpus []int) string {
	if len(cpus) == 1 {
		return fmt.Sprintf("CPU %d", cpus[0])
	}
	s := make([]string, len(cpus))
	for i, c := range cpus {
		s[i] = strconv.Itoa(c)
	}
	return "CPUs " + strings.Join(s, ",")
}

// setProcessAffinity moves every thread of process pid to cpus. A thread
// created while it runs inherits its creator's mask, which may be the old
// one: it repeats until a pass finds no thread it had not moved.
func setProcessAffinity(pid int, cpus []int) error {
	var set unix.CPUSet
	for _, c := range cpus {
		set.Set(c)
	}
	done := map[int]bool{}
	for pass := 0; pass < 10; pass++ {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return err
		}
		moved := 0
		for _, ent := range ents {
			tid, err := strconv.Atoi(ent.Name())
			if err != nil || done[tid] {
				continue
			}
			if err := unix.SchedSetaffinity(tid, &set); err != nil {
				if errors.Is(err, unix.ESRCH) { // the thread exited
					continue
				}
				return fmt.Errorf("sched_setaffinity(%d): %w", tid, err)
			}
			done[tid] = true
			moved++
		}
		if moved == 0 {
			return nil
		}
	}
	return fmt.Errorf("process %d keeps creating threads faster than they can be pinned", pid)
}

// postmasterPID reads the first line of the data directory's postmaster.pid.
func postmasterPID(dataDir string) (int, error) {
	raw, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, err
	}
	first, _, _ := strings.Cut(string(raw), "\n")
	return strconv.Atoi(strings.TrimSpace(first))
}

// parentPID parses the ppid from a /proc/PID/stat line, whose second field
// (the command) may hold spaces and parentheses.
func parentPID(stat string) (int, bool) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 2 {
		return 0, false
	}
	ppid, err := strconv.Atoi(f[1])
	return ppid, err == nil
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, ent := range ents {
		p, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + ent.Name() + "/stat")
		if err != nil {
			continue
		}
		if ppid, ok := parentPID(string(raw)); ok && ppid == pid {
			out = append(out, p)
		}
	}
	return out
}

// setPinned switches between the two layouts: pinned (PostgreSQL on
// split.pg, the bench and its brokers on split.rest) or not (everything on
// every CPU). It waits until the bench's own GOMAXPROCS has followed (the
// Go runtime re-reads its CPU mask about once a second; the broker
// processes do the same).
func (e *env) setPinned(ctx context.Context, on bool) error {
	if e.cluster == nil {
		return errors.New("--pin needs the bench's own PostgreSQL cluster (not --pg-url)")
	}
	pgCPUs, rest := e.cpus.all, e.cpus.all
	if on {
		pgCPUs, rest = e.cpus.pg, e.cpus.rest
	}
	pm, err := postmasterPID(e.cluster.DataDir)
	if err != nil {
		return fmt.Errorf("finding the postmaster: %w", err)
	}
	// The postmaster first, so that a backend forked meanwhile inherits
	// the new mask; then its children, twice, for one forked between the
	// scan and the move.
	if err := setProcessAffinity(pm, pgCPUs); err != nil {
		return fmt.Errorf("pinning PostgreSQL: %w", err)
	}
	for range 2 {
		for _, c := range childrenOf(pm) {
			if err := setProcessAffinity(c, pgCPUs); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("pinning PostgreSQL: %w", err)
			}
		}
	}
	for _, b := range e.children {
		if err := setProcessAffinity(b.pid(), rest); err != nil {
			return fmt.Errorf("pinning the broker: %w", err)
		}
	}
	if err := setProcessAffinity(os.Getpid(), rest); err != nil {
		return fmt.Errorf("pinning the bench: %w", err)
	}
	e.pinned = on
	deadline := time.Now().Add(5 * time.Second)
	for runtime.GOMAXPROCS(0) != len(rest) && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if runtime.GOMAXPROCS(0) != len(rest) {
		e.log.Warn("GOMAXPROCS did not follow the CPU mask", "gomaxprocs", runtime.GOMAXPROCS(0), "cpus", len(rest))
	}
	return nil
}

// modeName is how a mode appears in scenario names and notes.
func modeName(pinned bool) string {
	if pinned {
		return "pinned"
	}
	return "shared"
}

// pinnable says whether scenario s runs in every --pin mode.
func pinnable(s string) bool { return slices.Contains(pinnedScenarios, s) }
