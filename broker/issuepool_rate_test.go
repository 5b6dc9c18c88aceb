package broker

import (
	"testing"
	"time"
)

// TestIssueRateSizesThePool: the pool holds IssuePoolHorizon's worth of
// the observed issue rate, between the floor and Config.IssuePool, rises
// with a burst within the window and halves per window once the load
// stops.
func TestIssueRateSizesThePool(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	var r issueRate
	// 300 issues/s for two seconds.
	at := t0
	for range 600 {
		r.observe(at)
		at = at.Add(time.Second / 300)
	}
	if est := r.est; est < 280 || est > 320 {
		t.Fatalf("estimate after 2s at 300/s: %.1f", est)
	}
	if got, want := poolTarget(r.est, 1000), 75; got < want-5 || got > want+5 {
		t.Errorf("pool at 300/s: %d, want about %d (300/s × %v)", got, want, IssuePoolHorizon)
	}
	if got := poolTarget(r.est, 16); got != 16 {
		t.Errorf("pool at 300/s bounded by 16: %d", got)
	}
	// Idle for a while: each window folds in the slow one.
	at = at.Add(10 * time.Second)
	r.observe(at)
	if r.est > 0.6*300 {
		t.Errorf("estimate after 10s idle: %.1f, want it about halved", r.est)
	}
	for range 5 {
		at = at.Add(2 * time.Second)
		r.observe(at)
	}
	if got := poolTarget(r.est, 64); got != IssuePoolFloor {
		t.Errorf("pool after the load stopped: %d, want the floor %d", got, IssuePoolFloor)
	}
	if got := poolTarget(0, 2); got != 2 {
		t.Errorf("floor above the bound: %d, want the bound 2", got)
	}
	// A burst raises it within the window, without waiting for it to end.
	var b issueRate
	at = t0
	for range 150 {
		b.observe(at)
		at = at.Add(time.Millisecond)
	}
	if got := poolTarget(b.est, 1000); got < 200 {
		t.Errorf("pool after 150 issues in 150ms: %d, want it sized to about 1000/s", got)
	}
}
