package broker

import (
	"container/heap"
	"sync"
	"time"
)

// ExpiryQueue is a min-heap of (due time, lease id) with at most one entry
// per lease, so a renewal moves the lease's entry instead of adding one.
// It holds no lease records: the store is the source of truth, and a popped
// entry is checked against it before anything is revoked.
type ExpiryQueue struct {
	mu    sync.Mutex
	items expiryHeap
	index map[string]*expiryItem
	// targets maps a lease to its target, so the dispatcher can hand it to
	// that target's revocation lane. Unlike the heap entry it outlives
	// PopDue (the lease is still being revoked, and may come back); Remove
	// drops it.
	targets map[string]string
	// wake is signalled when the earliest due time may have moved earlier.
	wake chan struct{}
}

type expiryItem struct {
	due time.Time
	id  string
	pos int
}

type expiryHeap []*expiryItem

func (h expiryHeap) Len() int           { return len(h) }
func (h expiryHeap) Less(i, j int) bool { return h[i].due.Before(h[j].due) }
func (h expiryHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].pos, h[j].pos = i, j
}
func (h *expiryHeap) Push(x any) {
	it := x.(*expiryItem)
	it.pos = len(*h)
	*h = append(*h, it)
}
func (h *expiryHeap) Pop() any {
	old := *h
	n := len(old)
	it := old[n-1]
	old[n-1] = nil
	*h = old[:n-1]
	return it
}

// NewExpiryQueue returns an empty queue.
func NewExpiryQueue() *ExpiryQueue {
	return &ExpiryQueue{index: make(map[string]*expiryItem), targets: make(map[string]string), wake: make(chan struct{}, 1)}
}

// Set schedules id at due, moving its entry if it has one.
//
// Due times are wall-clock instants: a lease's expiry is stored as one.
// Set strips any monotonic reading (time.Now() carries one, and Add keeps
// it), because Before and After compare two times by their monotonic
// readings when both have one and by wall time otherwise: a heap holding
// both kinds would order entries by two different clocks once the wall
// clock steps, and break its invariant.
func (q *ExpiryQueue) Set(id string, due time.Time) {
	due = due.Round(0)
	q.mu.Lock()
	if it, ok := q.index[id]; ok {
		it.due = due
		heap.Fix(&q.items, it.pos)
	} else {
		it := &expiryItem{due: due, id: id}
		heap.Push(&q.items, it)
		q.index[id] = it
	}
	first := q.items[0].id == id
	q.mu.Unlock()
	if first {
		q.signal()
	}
}

// SetTarget records the target of lease id (see Target).
func (q *ExpiryQueue) SetTarget(id, target string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.targets[id] = target
}

// Target is the target SetTarget recorded for id, "" if none.
func (q *ExpiryQueue) Target(id string) string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.targets[id]
}

// Remove drops id's entry and its target, if any.
func (q *ExpiryQueue) Remove(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.targets, id)
	if it, ok := q.index[id]; ok {
		heap.Remove(&q.items, it.pos)
		delete(q.index, id)
	}
}

// Len is the number of scheduled leases.
func (q *ExpiryQueue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// Next returns the earliest due time, and false when the queue is empty.
func (q *ExpiryQueue) Next() (time.Time, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) == 0 {
		return time.Time{}, false
	}
	return q.items[0].due, true
}

// PopDue removes and returns up to max ids due at or before now, earliest first.
func (q *ExpiryQueue) PopDue(now time.Time, max int) []string {
	now = now.Round(0) // compared by wall time, as the entries are (see Set)
	q.mu.Lock()
	defer q.mu.Unlock()
	var ids []string
	for len(q.items) > 0 && len(ids) < max && !q.items[0].due.After(now) {
		it := heap.Pop(&q.items).(*expiryItem)
		delete(q.index, it.id)
		ids = append(ids, it.id)
	}
	return ids
}

// WakeIfDue wakes the dispatcher if an entry is due at now by the wall
// clock. The dispatcher sleeps on a timer, which runs on the monotonic
// clock: when the wall clock steps forward, entries fall due that its
// timer knows nothing of, and a periodic call of WakeIfDue bounds their
// delay. (A step back needs nothing: the dispatcher finds nothing due when
// its timer fires, and waits again.)
func (q *ExpiryQueue) WakeIfDue(now time.Time) {
	if next, ok := q.Next(); ok && !next.After(now.Round(0)) {
		q.signal()
	}
}

func (q *ExpiryQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}
