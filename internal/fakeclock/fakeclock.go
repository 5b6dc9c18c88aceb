// Package fakeclock is a controllable broker.Clock for tests: time moves
// only when a test calls Advance (or Step, a wall-clock step), so expiry
// can be tested without sleeps.
package fakeclock

import (
	"sync"
	"time"
)

// Clock is a manual clock. The zero value is not usable; call New.
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
	changed chan struct{} // closed and replaced whenever waiters change
}

type waiter struct {
	at time.Time
	ch chan time.Time
}

// New returns a clock at t.
func New(t time.Time) *Clock { return &Clock{now: t, changed: make(chan struct{})} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// After returns a channel that receives once the clock has been advanced
// by d.
func (c *Clock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, waiter{at: c.now.Add(d), ch: ch})
	c.notify()
	return ch
}

// Advance moves the clock forward by d and fires every waiter that is due.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.at.After(c.now) {
			w.ch <- c.now
		} else {
			kept = append(kept, w)
		}
	}
	c.waiters = kept
	c.notify()
}

// Step moves the clock's wall time by d, forward or back, as an NTP step
// or an operator's date command does. Go's timers run on the monotonic
// clock, which a step does not move, so every pending After channel keeps
// the time it has left: none fires, and each fires when Advance has moved
// the clock by that much.
func (c *Clock) Step(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for i := range c.waiters {
		c.waiters[i].at = c.waiters[i].at.Add(d)
	}
	c.notify()
}

// Waiters returns how many After channels are pending.
func (c *Clock) Waiters() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.waiters)
}

// WaitersUntil returns how many pending After channels fire once the clock
// reaches t, so a test can wait for one particular timer (a loop's next
// tick, say) to be armed before it moves the clock.
func (c *Clock) WaitersUntil(t time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, w := range c.waiters {
		if !w.at.After(t) {
			n++
		}
	}
	return n
}

// Changed returns a channel closed the next time the set of waiters changes,
// so a test can wait for a goroutine to block on the clock without polling.
func (c *Clock) Changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

func (c *Clock) notify() {
	close(c.changed)
	c.changed = make(chan struct{})
}
