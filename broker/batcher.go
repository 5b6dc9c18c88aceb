package broker

import (
	"sync"
	"time"
)

// batcher queues calls per target and runs them in batches: up to slots
// goroutines per target each take what is pending (at most max) and run
// it, and whatever arrives meanwhile forms the next batch. After a batch
// of several, a goroutine waits up to linger for as many calls to be
// pending again before it runs the next: the callers it answered come
// back about a round trip later, and without the wait a batch of one or
// two would go first, costing nearly as many round trips and commits as a
// full one. There is no goroutine while nothing is pending. Renewals
// (renewbatch.go) and requested revocations (revokebatch.go) use it.
//
// Its goroutines are counted in wg (the broker's), so that Broker.Close
// returns only once they have ended. close stops it from starting more:
// every wg.Add happens under mu before closed is set, so none can race
// Close's wg.Wait.
type batcher[C any] struct {
	slots  int           // batch goroutines per target
	max    int           // calls per batch
	linger time.Duration // <= 0: no wait
	run    func(target string, batch []C)

	mu      sync.Mutex
	pending map[string][]C // by target
	running map[string]int // batch goroutines (and lone callers) per target
	// lingering is the goroutine of a target waiting for more calls.
	lingering map[string]*batchLinger
	// after is the linger's timer: time's, or a test's.
	after func(time.Duration) <-chan time.Time
	wg    *sync.WaitGroup
	// closed: add queues nothing more (close).
	closed bool
}

// batchLinger is one wait for more calls: ready closes once want are
// pending.
type batchLinger struct {
	want  int
	ready chan struct{}
}

func newBatcher[C any](slots, max int, linger time.Duration, run func(string, []C), wg *sync.WaitGroup) batcher[C] {
	return batcher[C]{
		slots: slots, max: max, linger: linger, run: run, wg: wg,
		pending: map[string][]C{}, running: map[string]int{}, lingering: map[string]*batchLinger{},
	}
}

// add queues c on target's batch, starting a batch goroutine if fewer
// than slots run, and returns true. Else it queues nothing and returns
// false, and the caller runs c alone: with aloneWhenIdle when none runs,
// the caller then holding one of target's slots until it calls release;
// and once the batcher is closed (the broker is closing, and starts no
// more goroutines), the caller holding a slot only with aloneWhenIdle.
func (q *batcher[C]) add(target string, c C, aloneWhenIdle bool) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if (aloneWhenIdle && q.running[target] == 0) || q.closed {
		if aloneWhenIdle {
			q.running[target]++
		}
		return false
	}
	q.pending[target] = append(q.pending[target], c)
	if l := q.lingering[target]; l != nil && len(q.pending[target]) >= l.want {
		close(l.ready)
		delete(q.lingering, target)
	}
	if q.running[target] < max(q.slots, 1) {
		q.running[target]++
		q.start(target)
	}
	return true
}

// start runs loop(target) on a goroutine counted in wg. Callers hold mu
// and have checked that the batcher is not closed.
func (q *batcher[C]) start(target string) {
	q.wg.Add(1)
	go func() {
		defer q.wg.Done()
		q.loop(target)
	}()
}

// release gives back the slot a lone caller held (add returned false
// with aloneWhenIdle): a goroutine runs what queued meanwhile, or the
// slot is freed. Once the batcher is closed, the caller runs what queued
// itself, before it returns, rather than leave those calls unanswered:
// it is a caller's goroutine, as its own lone call was, not the broker's.
func (q *batcher[C]) release(target string) {
	q.mu.Lock()
	if len(q.pending[target]) > 0 {
		if q.closed {
			q.mu.Unlock()
			q.loop(target)
			return
		}
		q.start(target)
		q.mu.Unlock()
		return
	}
	if q.running[target]--; q.running[target] == 0 {
		delete(q.running, target)
	}
	q.mu.Unlock()
}

// close makes add queue nothing more and start no goroutine: the broker
// is closing, and waits (wg) for those that run. They run what is
// pending, as always, then end; one lingering for more calls, which can
// no longer come, stops waiting.
func (q *batcher[C]) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	for target, l := range q.lingering {
		close(l.ready)
		delete(q.lingering, target)
	}
}

// pendingCalls reports how many calls wait for a batch (for tests).
func (q *batcher[C]) pendingCalls() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, calls := range q.pending {
		n += len(calls)
	}
	return n
}

// loop runs batches for one target until none is pending (after the
// linger, if any).
func (q *batcher[C]) loop(target string) {
	last := 0 // the size of the batch this goroutine ran last
	for {
		q.mu.Lock()
		calls := q.pending[target]
		if want := min(last, q.max); want > 1 && len(calls) < want && q.linger > 0 && !q.closed {
			q.wait(target, want)
			calls = q.pending[target]
		}
		if len(calls) == 0 {
			delete(q.pending, target)
			if q.running[target]--; q.running[target] == 0 {
				delete(q.running, target)
			}
			q.mu.Unlock()
			return
		}
		n := min(len(calls), q.max)
		batch := calls[:n:n]
		if n == len(calls) {
			delete(q.pending, target)
		} else {
			q.pending[target] = calls[n:]
		}
		q.mu.Unlock()
		q.run(target, batch)
		last = n
	}
}

// wait waits, with q.mu held on entry and on return, until want calls of
// target are pending or the linger has passed.
func (q *batcher[C]) wait(target string, want int) {
	l := &batchLinger{want: want, ready: make(chan struct{})}
	q.lingering[target] = l
	after := q.after
	q.mu.Unlock()
	var timeout <-chan time.Time
	if after != nil {
		timeout = after(q.linger)
	} else {
		t := time.NewTimer(q.linger)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-l.ready:
	case <-timeout:
	}
	q.mu.Lock()
	if q.lingering[target] == l {
		delete(q.lingering, target)
	}
}
