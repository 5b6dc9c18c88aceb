package broker

import (
	"slices"
	"testing"
	"time"
)

var queueT0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func dueAt(s int) time.Time { return queueT0.Add(time.Duration(s) * time.Second) }

// woken reports whether the queue signalled its dispatcher, and clears the
// signal.
func woken(q *ExpiryQueue) bool {
	select {
	case <-q.wake:
		return true
	default:
		return false
	}
}

func TestUnitExpiryQueueOrder(t *testing.T) {
	q := NewExpiryQueue()
	if _, ok := q.Next(); ok {
		t.Fatal("an empty queue has a next due time")
	}
	for _, e := range []struct {
		id  string
		due int
	}{{"c", 30}, {"a", 10}, {"e", 50}, {"b", 20}, {"d", 40}} {
		q.Set(e.id, dueAt(e.due))
	}
	if next, ok := q.Next(); !ok || !next.Equal(dueAt(10)) {
		t.Errorf("Next = %v, %v; want %v", next, ok, dueAt(10))
	}
	if got := q.PopDue(dueAt(100), 10); !slices.Equal(got, []string{"a", "b", "c", "d", "e"}) {
		t.Errorf("PopDue = %v, want in due order", got)
	}
	if q.Len() != 0 {
		t.Errorf("Len after popping everything = %d", q.Len())
	}
}

func TestUnitExpiryQueueSetMovesAndRemove(t *testing.T) {
	q := NewExpiryQueue()
	q.Set("a", dueAt(10))
	q.Set("b", dueAt(20))
	q.Set("a", dueAt(30)) // a renewal moves the entry, never adds one
	if q.Len() != 2 {
		t.Fatalf("Len = %d, want 2: one entry per lease", q.Len())
	}
	if next, _ := q.Next(); !next.Equal(dueAt(20)) {
		t.Errorf("Next = %v after moving a later, want %v", next, dueAt(20))
	}
	q.Set("a", dueAt(5)) // and earlier again
	if got := q.PopDue(dueAt(100), 10); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("PopDue = %v, want [a b]", got)
	}

	q.Set("a", dueAt(10))
	q.Set("b", dueAt(20))
	q.Remove("a")
	q.Remove("missing") // no-op
	if q.Len() != 1 {
		t.Fatalf("Len after Remove = %d, want 1", q.Len())
	}
	if got := q.PopDue(dueAt(100), 10); !slices.Equal(got, []string{"b"}) {
		t.Errorf("PopDue after Remove = %v, want [b]", got)
	}
}

func TestUnitExpiryQueuePopDue(t *testing.T) {
	q := NewExpiryQueue()
	for i, id := range []string{"a", "b", "c", "d"} {
		q.Set(id, dueAt(10*(i+1))) // 10, 20, 30, 40
	}
	if got := q.PopDue(dueAt(9), 10); len(got) != 0 {
		t.Errorf("PopDue before anything is due = %v", got)
	}
	// Due at exactly now counts; not yet due stays.
	if got := q.PopDue(dueAt(20), 10); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("PopDue(20s) = %v, want [a b]", got)
	}
	// At most max.
	if got := q.PopDue(dueAt(100), 1); !slices.Equal(got, []string{"c"}) {
		t.Errorf("PopDue(max 1) = %v, want [c]", got)
	}
	if next, ok := q.Next(); !ok || !next.Equal(dueAt(40)) || q.Len() != 1 {
		t.Errorf("left: next %v, len %d; want d at %v", next, q.Len(), dueAt(40))
	}
	// A popped lease is gone: setting it again adds it back.
	q.Set("a", dueAt(50))
	if q.Len() != 2 {
		t.Errorf("Len = %d after setting a popped lease, want 2", q.Len())
	}
}

func TestUnitExpiryQueueNotify(t *testing.T) {
	q := NewExpiryQueue()
	q.Set("a", dueAt(20))
	if !woken(q) {
		t.Error("the first entry did not wake the dispatcher")
	}
	q.Set("b", dueAt(30))
	if woken(q) {
		t.Error("a later entry woke the dispatcher, whose timer is already right")
	}
	q.Set("c", dueAt(10))
	q.Set("d", dueAt(5))
	if !woken(q) {
		t.Error("a new earliest entry did not wake the dispatcher")
	}
	if woken(q) {
		t.Error("two signals queued: the wake channel must coalesce them")
	}
	q.Set("b", dueAt(1)) // moving an entry to the front wakes too
	if !woken(q) {
		t.Error("moving an entry to the front did not wake the dispatcher")
	}
	q.Remove("b")
	q.PopDue(dueAt(100), 10)
	if woken(q) {
		t.Error("Remove or PopDue woke the dispatcher")
	}
}

// The queue holds wall-clock instants only: a due time with a monotonic
// reading (time.Now() has one) would be ordered by another clock than the
// stored expiries once the wall clock steps.
func TestQueueStripsMonotonicReadings(t *testing.T) {
	q := NewExpiryQueue()
	due := time.Now().Add(time.Minute)
	if due == due.Round(0) {
		t.Skip("this platform's time.Now has no monotonic reading")
	}
	q.Set("a", due)
	next, ok := q.Next()
	if !ok || next != due.Round(0) {
		t.Errorf("Next() = %v (%v), want %v without its monotonic reading", next, ok, due.Round(0))
	}
	q.Set("a", due.Add(time.Second)) // a move strips too
	if next, _ := q.Next(); next != due.Add(time.Second).Round(0) {
		t.Errorf("after a move, Next() = %v, want it without a monotonic reading", next)
	}
}

func TestQueueWakeIfDue(t *testing.T) {
	q := NewExpiryQueue()
	q.WakeIfDue(dueAt(100))
	if woken(q) {
		t.Error("an empty queue woke its dispatcher")
	}
	q.Set("a", dueAt(10))
	woken(q) // Set's own signal
	q.WakeIfDue(dueAt(9))
	if woken(q) {
		t.Error("woke the dispatcher before anything was due")
	}
	q.WakeIfDue(dueAt(10))
	if !woken(q) {
		t.Error("did not wake the dispatcher for an entry due now")
	}
}

func TestQueueTargetOutlivesPopDueUntilRemove(t *testing.T) {
	q := NewExpiryQueue()
	q.Set("a", dueAt(1))
	q.SetTarget("a", "main")
	q.PopDue(dueAt(1), 10)
	if got := q.Target("a"); got != "main" {
		t.Errorf("target after PopDue = %q, want main (the lease is still being revoked)", got)
	}
	q.Remove("a")
	if got := q.Target("a"); got != "" {
		t.Errorf("target after Remove = %q, want none", got)
	}
}
