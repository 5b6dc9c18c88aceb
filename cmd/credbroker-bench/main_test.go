package main

import (
	"bytes"
	"math"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain lets the restore scenario exec this test binary as the server,
// as it execs credbroker-bench itself in a real run.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == serveChildCmd {
		os.Exit(serveChild(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// TestSmoke runs every scenario at tiny sizes against a throwaway cluster,
// to keep the command working. It asserts that each scenario reports its
// rows, never what the figures are: they depend on the machine.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	var out, errb bytes.Buffer
	code := run(t.Context(), []string{
		"-levels", "1,2", "-phase", "150ms", "-rounds", "2",
		"-renew-concurrency", "2", "-renew-leases", "2",
		"-revoke-concurrency", "2", "-revoke-n", "20",
		"-expiry-n", "20", "-broker-revoke-rate", "1000",
		"-restore-records", "3000", "-restore-active", "300",
		"-churn-rate", "600", "-churn-duration", "1h", "-retention", "1h",
		"-pg-durable=false", "-etcd-clients", "2",
		"-failover-kills", "1", "-failover-session-ttl", "2s",
		"-streams", "20", "-streams-ttl", "3s", "-streams-window", "1500ms",
	}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	for _, want := range []string{
		"| issue c=1 ", "| issue c=2 ", "| revoke c=2 ", "| renew c=2 stream ", "| renew c=2 unary ",
		"| issue c=1 pinned ", "| issue c=2 pinned ", "| revoke c=2 pinned ", "| renew c=2 stream pinned ",
		"| throughput (baseline hashing each user's verifier) ", "| throughput (strict baseline: one precomputed verifier) ",
		"| CPU per credential (broker process; baseline: its client) ",
		"| streams N=20, TTL 3s ", "| broker CPU per renewal ", "| RSS per live lease ",
		"| expiry burst N=20 ", "| restore 3000 records", "| bbolt file, ",
		"| etcd store issue c=2 ", "| etcd store renew c=2 ",
		"| etcd broker issue c=2 ", "| etcd broker renew (unary) c=2 ",
		"| failover ×1, session_ttl 2s ",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no row %q in the table:\n%s", want, out.String())
		}
	}
	if !strings.Contains(out.String(), "\nload average: ") {
		t.Errorf("no load average line:\n%s", out.String())
	}
	if strings.Contains(out.String(), "operations failed") || strings.Contains(out.String(), "failed:") {
		t.Errorf("some operations failed:\n%s", out.String())
	}
}

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"unknown scenario", []string{"-scenarios", "issue,nope"}},
		{"bad level", []string{"-levels", "1,zero"}},
		{"broker without target", []string{"-broker", "127.0.0.1:7450"}},
		{"more active than records", []string{"-restore-records", "10", "-restore-active", "11"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			if code := run(t.Context(), tc.args, &out, &errb); code != 2 {
				t.Errorf("exit %d, want 2 (stderr: %s)", code, errb.String())
			}
		})
	}
}

// TestVersion: --version names the build (package buildinfo) and exits 0.
func TestVersion(t *testing.T) {
	var out, errOut strings.Builder
	if code := run(t.Context(), []string{"--version"}, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "credbroker-bench version ") {
		t.Errorf("--version: exit %d, %q (stderr %q)", code, out.String(), errOut.String())
	}
}

func TestSeries(t *testing.T) {
	for _, tc := range []struct {
		s             series
		med, min, max float64
	}{
		{series{3, 1, 2}, 2, 1, 3},
		{series{4, 1, 3, 2}, 2.5, 1, 4},
		{series{7}, 7, 7, 7},
		{nil, 0, 0, 0},
	} {
		if got := tc.s.median(); got != tc.med {
			t.Errorf("%v.median() = %v, want %v", tc.s, got, tc.med)
		}
		if tc.s.min() != tc.min || tc.s.max() != tc.max {
			t.Errorf("%v: min, max = %v, %v, want %v, %v", tc.s, tc.s.min(), tc.s.max(), tc.min, tc.max)
		}
	}
	// The median is not changed by sorting: the caller's order stays.
	s := series{3, 1, 2}
	_ = s.median()
	if s[0] != 3 {
		t.Errorf("median sorted its receiver: %v", s)
	}
	if got, want := (series{300, 290, 330}).format(fmtRate), "300/s (290/s–330/s)"; got != want {
		t.Errorf("format = %q, want %q", got, want)
	}
	if got, want := (series{0.5}).format(fmtRatio), "0.50"; got != want {
		t.Errorf("format of one round = %q, want %q", got, want)
	}
	if got := series(nil).format(fmtRatio); got != "—" {
		t.Errorf("format of no round = %q", got)
	}
	if got, want := ratios(series{1, 2, 3}, series{2, 0, 3}), (series{0.5, 1}); !slices.Equal(got, want) {
		t.Errorf("ratios = %v, want %v (a zero baseline is left out)", got, want)
	}
	if got, want := diffs(series{0.003, 0.004}, series{0.001, 0.005}), (series{0.002, -0.001}); len(got) != 2 ||
		math.Abs(got[0]-want[0]) > 1e-12 || math.Abs(got[1]-want[1]) > 1e-12 {
		t.Errorf("diffs = %v, want %v", got, want)
	}
	if got, want := fmtDelta(0.00055), "+0.55ms"; got != want {
		t.Errorf("fmtDelta = %q, want %q", got, want)
	}
	if got, want := fmtDelta(-0.0012), "−1.20ms"; got != want {
		t.Errorf("fmtDelta = %q, want %q", got, want)
	}
}

func TestRoundRows(t *testing.T) {
	ms := func(v float64) float64 { return v / 1000 }
	// Throughput: the median of the per-round ratios decides.
	r := issueTputRow("issue c=16", "throughput", series{96, 90, 100}, series{100, 100, 100}, true)
	if r.met != "yes" || r.ratio != "0.96 (0.90–1.00)" || r.target != "≥ 0.95" {
		t.Errorf("tput row = %+v", r)
	}
	if r := issueTputRow("issue c=16", "throughput", series{94, 99, 90}, series{100, 100, 100}, true); r.met != "NO" {
		t.Errorf("median 0.94 met the 0.95 target: %+v", r)
	}
	if r := issueTputRow("issue c=4", "throughput", series{1}, series{2}, false); r.target != "" || r.met != "" {
		t.Errorf("a level without target got one: %+v", r)
	}
	// p50 at one client: the median of the per-round differences.
	quiet := issueP50Row("issue c=1", series{ms(5), ms(5.5), ms(9)}, series{ms(4.2), ms(4.4), ms(4)}, true, false)
	if quiet.met != "NO" || !strings.Contains(quiet.ratio, "+1.10ms") {
		t.Errorf("p50 +1.10ms median met ≤ +1ms: %+v", quiet)
	}
	busy := issueP50Row("issue c=1", series{ms(5), ms(5.5), ms(9)}, series{ms(4.2), ms(4.4), ms(4)}, true, true)
	if busy.met != "yes" || !strings.Contains(busy.target, "+2.00ms") {
		t.Errorf("p50 +1.10ms median on a busy machine: %+v", busy)
	}
	// CPU per credential: verifier cost + 0.3 ms.
	if r := issueCPURow("issue c=16", series{ms(1.0), ms(0.9), ms(1.2)}, series{ms(0.8)}, 700*time.Microsecond, true); r.met != "yes" {
		t.Errorf("1.0ms median within 0.7+0.3ms: %+v", r)
	}
	if r := issueCPURow("issue c=16", series{ms(1.1), ms(1.05), ms(1.2)}, series{ms(0.8)}, 700*time.Microsecond, true); r.met != "NO" {
		t.Errorf("1.1ms median within 0.7+0.3ms: %+v", r)
	}
	rows := tputLatencyRows("renew c=2 stream",
		[]result{{ops: 90, elapsed: time.Second}, {ops: 80, elapsed: time.Second}, {ops: 100, elapsed: time.Second}},
		[]result{{ops: 100, elapsed: time.Second}, {ops: 100, elapsed: time.Second}, {ops: 100, elapsed: time.Second}}, true)
	if rows[0].ratio != "0.90 (0.80–1.00)" || rows[0].met != "yes" {
		t.Errorf("renew rows = %+v", rows)
	}
}

func TestReportMode(t *testing.T) {
	rep := &report{}
	rep.add(row{scenario: "issue c=1"})
	rep.mode = "pinned"
	rep.add(row{scenario: "issue c=1"}, row{scenario: "renew c=16 stream"})
	var got []string
	for _, r := range rep.rows {
		got = append(got, r.scenario)
	}
	if want := []string{"issue c=1", "issue c=1 pinned", "renew c=16 stream pinned"}; !slices.Equal(got, want) {
		t.Errorf("scenarios %q, want %q", got, want)
	}
}

func TestLoadAverage(t *testing.T) {
	l := parseLoadAvg("2.50 1.20 0.80 3/512 12345\n")
	if !l.ok || l.one != 2.5 || l.five != 1.2 || l.fifteen != 0.8 || l.String() != "2.50 1.20 0.80" {
		t.Fatalf("parseLoadAvg = %+v", l)
	}
	if !l.busy(2) || l.busy(4) {
		t.Errorf("load 2.5: busy(2) = %v, busy(4) = %v", l.busy(2), l.busy(4))
	}
	if w := busyWarning(l, parseLoadAvg("3.00 2 1"), 2); !strings.Contains(w, "busy") || !strings.Contains(w, "2.50") {
		t.Errorf("busy warning %q", w)
	}
	if w := busyWarning(parseLoadAvg("1.5 1 1"), l, 2); w != "" {
		t.Errorf("a quiet start warned: %q", w)
	}
	if bad := parseLoadAvg("x y z"); bad.ok || bad.busy(1) || bad.String() != "unknown" {
		t.Errorf("garbage parsed: %+v", bad)
	}
}

func TestProcStat(t *testing.T) {
	// The command may hold spaces and parentheses.
	stat := "4242 (post gres: (x)) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 1 0 100 1000 10"
	cpu, err := parseStatCPU(stat)
	if err != nil || cpu != 3800*time.Millisecond {
		t.Errorf("parseStatCPU = %v, %v; want 3.8s", cpu, err)
	}
	if ppid, ok := parentPID(stat); !ok || ppid != 17 {
		t.Errorf("parentPID = %d, %v; want 17", ppid, ok)
	}
	if _, err := parseStatCPU("4242 (x) S 1"); err == nil {
		t.Error("a short stat line parsed")
	}
}

func TestSplitCPUs(t *testing.T) {
	s, err := splitCPUs([]int{0, 1})
	if err != nil || !slices.Equal(s.pg, []int{0}) || !slices.Equal(s.rest, []int{1}) || !slices.Equal(s.all, []int{0, 1}) {
		t.Errorf("splitCPUs(0,1) = %+v, %v", s, err)
	}
	s, err = splitCPUs([]int{2, 3, 5, 7})
	if err != nil || !slices.Equal(s.pg, []int{2, 3}) || !slices.Equal(s.rest, []int{5, 7}) {
		t.Errorf("splitCPUs(2,3,5,7) = %+v, %v", s, err)
	}
	if _, err := splitCPUs([]int{0}); err == nil {
		t.Error("one CPU split")
	}
	if got := fmtCPUs([]int{5, 7}); got != "CPUs 5,7" {
		t.Errorf("fmtCPUs = %q", got)
	}
}

// TestSetProcessAffinity pins a real process and reads its mask back.
func TestSetProcessAffinity(t *testing.T) {
	cpus, err := allowedCPUs()
	if err != nil || len(cpus) == 0 {
		t.Fatalf("allowedCPUs = %v, %v", cpus, err)
	}
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	last := cpus[len(cpus)-1]
	if err := setProcessAffinity(cmd.Process.Pid, []int{last}); err != nil {
		t.Fatal(err)
	}
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(cmd.Process.Pid, &set); err != nil {
		t.Fatal(err)
	}
	if set.Count() != 1 || !set.IsSet(last) {
		t.Errorf("mask after pinning to CPU %d: %d CPUs, CPU %d set: %v", last, set.Count(), last, set.IsSet(last))
	}
}

func TestPinFlag(t *testing.T) {
	var errb bytes.Buffer
	o, err := parseFlags(nil, &errb)
	if err != nil {
		t.Fatal(err)
	}
	if want := "both"; numCPU() >= 2 && o.pin != want {
		t.Errorf("default --pin = %q, want %q", o.pin, want)
	}
	o, err = parseFlags([]string{"-pg-url", "postgres://a@h/db"}, &errb)
	if err != nil || o.pin != "off" {
		t.Errorf("--pg-url: --pin = %q, %v; want off", o.pin, err)
	}
	for _, args := range [][]string{
		{"-pin", "sometimes"},
		{"-pin", "on", "-pg-url", "postgres://a@h/db"},
		{"-streams", "0"},
		{"-streams-conns", "-1"},
		{"-streams-ttl", "1s"},
	} {
		if _, err := parseFlags(args, &errb); err == nil {
			t.Errorf("%q accepted", args)
		}
	}
}
