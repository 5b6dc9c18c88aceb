package broker

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestUnitKeyedMutexSerializesOneKey(t *testing.T) {
	var k keyedMutex
	var inside, overlaps atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				unlock := k.Lock("a")
				if inside.Add(1) > 1 {
					overlaps.Add(1)
				}
				inside.Add(-1)
				unlock()
			}
		})
	}
	wg.Wait()
	if n := overlaps.Load(); n > 0 {
		t.Errorf("%d times two holders of one key were inside at once", n)
	}
	if n := len(k.locks); n != 0 {
		t.Errorf("%d keys remembered after every holder left, want 0", n)
	}
}

func TestUnitKeyedMutexKeysAreIndependent(t *testing.T) {
	var k keyedMutex
	unlockA := k.Lock("a")
	done := make(chan struct{})
	go func() {
		defer close(done)
		k.Lock("b")() // must not wait for "a"
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("locking b waited for a")
	}
	unlockA()
}

func TestUnitKeyedMutexTryLock(t *testing.T) {
	var k keyedMutex
	unlock := k.Lock("a")
	if _, ok := k.tryLock("a"); ok {
		t.Fatal("tryLock took a held key")
	}
	unlockB, ok := k.tryLock("b")
	if !ok {
		t.Fatal("tryLock refused a free key")
	}

	// A waiter counts as a holder: tryLock must not jump the queue.
	got := make(chan func())
	go func() { got <- k.Lock("a") }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		k.mu.Lock()
		refs := k.locks["a"].refs
		k.mu.Unlock()
		if refs == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the waiter never queued on a")
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	unlock()
	if _, ok := k.tryLock("a"); ok {
		t.Fatal("tryLock took a key somebody waits for")
	}
	(<-got)()
	unlockB()
	unlockA, ok := k.tryLock("a")
	if !ok {
		t.Fatal("tryLock refused a key nobody holds any more")
	}
	unlockA()
	if n := len(k.locks); n != 0 {
		t.Errorf("%d keys remembered after every holder left, want 0", n)
	}
}
