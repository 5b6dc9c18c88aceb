package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Noise: every figure is measured once per round and reported as the
// median of the rounds with their spread (min–max), so one round disturbed
// by the machine's other work neither makes nor breaks a figure, and a
// reader sees how far the rounds disagreed.

// series is one figure measured once per round.
type series []float64

// median is the middle value (the mean of the middle two for an even count).
func (s series) median() float64 {
	if len(s) == 0 {
		return 0
	}
	c := slices.Clone(s)
	slices.Sort(c)
	m := len(c) / 2
	if len(c)%2 == 1 {
		return c[m]
	}
	return (c[m-1] + c[m]) / 2
}

func (s series) min() float64 {
	if len(s) == 0 {
		return 0
	}
	return slices.Min(s)
}

func (s series) max() float64 {
	if len(s) == 0 {
		return 0
	}
	return slices.Max(s)
}

// format prints the median and, with more than one round, the spread:
// "312/s (298/s–330/s)".
func (s series) format(f func(float64) string) string {
	if len(s) == 0 {
		return "—"
	}
	if len(s) == 1 {
		return f(s[0])
	}
	return fmt.Sprintf("%s (%s–%s)", f(s.median()), f(s.min()), f(s.max()))
}

// ratios is a/b round by round (a round whose b is zero is left out).
func ratios(a, b series) series {
	var out series
	for i := range min(len(a), len(b)) {
		if b[i] != 0 {
			out = append(out, a[i]/b[i])
		}
	}
	return out
}

// diffs is a−b round by round.
func diffs(a, b series) series {
	out := make(series, 0, min(len(a), len(b)))
	for i := range min(len(a), len(b)) {
		out = append(out, a[i]-b[i])
	}
	return out
}

// perRound applies f to each round's result.
func perRound(rs []result, f func(result) float64) series {
	out := make(series, len(rs))
	for i, r := range rs {
		out[i] = f(r)
	}
	return out
}

func rates(rs []result) series { return perRound(rs, result.perSec) }

// pcts is each round's p-th latency percentile, in seconds.
func pcts(rs []result, p float64) series {
	return perRound(rs, func(r result) float64 { return r.pct(p).Seconds() })
}

// mergeAll is every round's operations together (for error notes).
func mergeAll(rs []result) result {
	var m result
	for _, r := range rs {
		m.merge(r)
	}
	return m
}

func fmtRatio(v float64) string { return fmt.Sprintf("%.2f", v) }

// fmtSecs prints seconds as fmtDur does.
func fmtSecs(v float64) string { return fmtDur(time.Duration(v * float64(time.Second))) }

// fmtDelta prints a signed difference in seconds: "+0.55ms".
func fmtDelta(v float64) string {
	if v < 0 {
		return "−" + fmtSecs(-v)
	}
	return "+" + fmtSecs(v)
}

// The machine's load.

// loadAverage is /proc/loadavg's three figures.
type loadAverage struct {
	one, five, fifteen float64
	ok                 bool
}

func (l loadAverage) String() string {
	if !l.ok {
		return "unknown"
	}
	return fmt.Sprintf("%.2f %.2f %.2f", l.one, l.five, l.fifteen)
}

func parseLoadAvg(s string) loadAverage {
	f := strings.Fields(s)
	if len(f) < 3 {
		return loadAverage{}
	}
	var l loadAverage
	var err error
	for i, p := range []*float64{&l.one, &l.five, &l.fifteen} {
		if *p, err = strconv.ParseFloat(f[i], 64); err != nil {
			return loadAverage{}
		}
	}
	l.ok = true
	return l
}

func readLoadAvg() loadAverage {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return loadAverage{}
	}
	return parseLoadAvg(string(raw))
}

// busy says whether the machine was busy with other work when the run
// began: a one-minute load average above the number of CPUs means runnable
// threads were already waiting for a CPU before the bench added its own.
func (l loadAverage) busy(cpus int) bool { return l.ok && l.one > float64(cpus) }

// busyWarning is the line the report prints when the run started busy.
func busyWarning(start, end loadAverage, cpus int) string {
	if !start.busy(cpus) {
		return ""
	}
	return fmt.Sprintf("WARNING: the machine was busy: load average %.2f at the start on %d CPUs (%.2f at the end); "+
		"absolute figures are not comparable with a quiet run's, ratios less so than usual, and the issue p50 target is the busy machine's (≤ +2ms)",
		start.one, cpus, end.one)
}

func numCPU() int { return runtime.NumCPU() }

// tputLatencyRows are the throughput and latency rows of the broker's
// rounds against the baseline's, round by round (median and spread); with
// withTarget, throughput has the target ≥ 0.90 (renew).
func tputLatencyRows(sc string, brk, base []result, withTarget bool) []row {
	bt, ht := rates(brk), rates(base)
	rs := ratios(bt, ht)
	tput := row{scenario: sc, figure: "throughput", broker: bt.format(fmtRate), baseline: ht.format(fmtRate), ratio: rs.format(fmtRatio)}
	if withTarget {
		tput.target, tput.met = "≥ 0.90", verdict(len(rs) > 0 && rs.median() >= 0.9)
	}
	b50, h50 := pcts(brk, 50), pcts(base, 50)
	lat := row{scenario: sc, figure: "latency p50 / p99", broker: b50.format(fmtSecs) + " / " + pcts(brk, 99).format(fmtSecs),
		baseline: h50.format(fmtSecs) + " / " + pcts(base, 99).format(fmtSecs), ratio: ratios(b50, h50).format(fmtRatio)}
	return []row{tput, lat}
}
