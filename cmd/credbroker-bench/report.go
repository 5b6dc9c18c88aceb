package main

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// The result table: one row per figure, and notes for what went wrong.

// row is one line of the result table.
type row struct {
	scenario, figure, broker, baseline, ratio, target, met string
}

type report struct {
	mu    sync.Mutex
	rows  []row
	notes []string
	// live, if set, gets each row as it is measured, so an interrupted
	// run still shows what it measured.
	live io.Writer
	// mode, if set, is appended to every row's scenario (--pin: "pinned").
	mode string
}

func (r *report) add(xs ...row) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, x := range xs {
		if r.mode != "" {
			x.scenario += " " + r.mode
		}
		r.rows = append(r.rows, x)
		if r.live != nil {
			fmt.Fprintf(r.live, "  %s | %s | broker %s | baseline %s | ratio %s\n", x.scenario, x.figure, x.broker, x.baseline, x.ratio)
		}
	}
}

func (r *report) note(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func fmtRate(v float64) string { return fmt.Sprintf("%.0f/s", v) }

func fmtDur(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return fmt.Sprintf("%.1fs", d.Seconds())
	case d >= time.Second:
		return fmt.Sprintf("%.2fs", d.Seconds())
	default:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
}

func ratio(a, b float64) string {
	if b == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func verdict(ok bool) string {
	if ok {
		return "yes"
	}
	return "NO"
}

// errNote says how many operations failed, and the first error.
func errNote(rep *report, what string, r result) {
	if r.errs > 0 {
		rep.note("%s: %d operations failed; first: %v", what, r.errs, r.firstErr)
	}
}
