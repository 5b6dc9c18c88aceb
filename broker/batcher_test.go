package broker

import (
	"slices"
	"sync"
	"testing"
)

// TestBatcherClosedStartsNoGoroutine: once closed, a batcher queues
// nothing (add answers false: run it alone) and starts no goroutine,
// so none can be added to the broker's WaitGroup while Close waits on
// it; what a lone caller's slot let queue before the close is run by
// that caller's release, before it returns, not left unanswered.
func TestBatcherClosedStartsNoGoroutine(t *testing.T) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ran [][]int
	q := newBatcher(1, 10, 0, func(_ string, batch []int) {
		mu.Lock()
		ran = append(ran, slices.Clone(batch))
		mu.Unlock()
	}, &wg)
	if q.add("t", 1, true) {
		t.Fatal("add on an idle target queued its call, want it run alone")
	}
	if !q.add("t", 2, true) {
		t.Fatal("add behind a lone caller did not queue")
	}
	q.close()
	if q.add("t", 3, false) || q.add("t", 4, true) {
		t.Fatal("add queued a call on a closed batcher")
	}
	// The first release after the close (call 4's) runs what queued.
	q.release("t")
	mu.Lock()
	got := slices.Clone(ran)
	mu.Unlock()
	if len(got) != 1 || !slices.Equal(got[0], []int{2}) {
		t.Errorf("batches run by the release: %v, want [[2]] run before it returned", got)
	}
	if n := q.pendingCalls(); n != 0 {
		t.Errorf("%d calls pending after the release, want none", n)
	}
	q.release("t") // call 1's slot
	q.mu.Lock()
	running, pending := len(q.running), len(q.pending)
	q.mu.Unlock()
	if running != 0 || pending != 0 {
		t.Errorf("after the releases: %d targets running, %d pending; want none", running, pending)
	}
	wg.Wait() // nothing was started on the WaitGroup: returns at once
}
