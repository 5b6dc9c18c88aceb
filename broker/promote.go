package broker

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Promotion. Issue stores a lease as Issuing beside its CREATE ROLE and
// returns the credential once both are durable (broker.go); writing the
// lease as Active then would put a second commit on every issue's path.
// Nothing needs it at once: Issuing behaves as Active everywhere
// (LeaseState.Usable) and is shown as Active (LeaseState.Public). So the
// promotion is written in the background, in batches: one goroutine at a
// time collects the promotions of promoteDelay (or promoteBatch of them,
// whichever comes first) and writes them with one UpdateLeases (one
// commit). Writing each one at once cost a lone client dearly: the store
// has one writer, so the next issue's lease commit queued behind the
// previous issue's promotion (at one client, the bench's p50 went from
// +10 ms to +17 ms over the baseline on a busy machine). Once a second,
// the promotion shares the writer with about one issue in thirty at that
// rate.
//
// A promotion that is lost (a crash, a store error) leaves the lease
// Issuing with its user in place; the reconciler promotes such a lease
// (reconcile.go), at start-up and periodically. A lease changed meanwhile
// (renewed) is read again and promoted if it is still Issuing; one whose
// revocation began is left as it is.

// promotions holds the leases waiting to be written as Active.
type promotions struct {
	mu      sync.Mutex
	pending []Lease
	running bool
	// flush, signalled by flushPromotions, ends the wait at once.
	flush chan struct{}
	// issued holds the ids queued or being written: their credential is
	// out, so the reconciler must treat them as Active, not as an issue
	// a crash cut short.
	issued map[string]struct{}
	wg     sync.WaitGroup
}

const (
	// promoteDelay is how long a promotion waits for others to share its
	// commit; promoteBatch pending promotions are written at once.
	promoteDelay = time.Second
	promoteBatch = 512
)

// promote queues l, as stored by Issue, for its promotion to Active.
func (b *Broker) promote(l Lease) {
	p := &b.promos
	p.mu.Lock()
	if p.flush == nil {
		p.flush = make(chan struct{}, 1)
	}
	p.pending = append(p.pending, l)
	if len(p.pending) >= promoteBatch {
		select {
		case p.flush <- struct{}{}:
		default:
		}
	}
	if p.issued == nil {
		p.issued = make(map[string]struct{})
	}
	p.issued[l.ID] = struct{}{}
	start := !p.running
	if start {
		p.running = true
		p.wg.Add(1)
	}
	p.mu.Unlock()
	if start {
		go b.promoteLoop()
	}
}

// promoteLoop writes batches until none is pending. It waits
// promoteDelay before each batch, unless flushed (a full batch, Close,
// WaitPromotions). The wait is on real time, not the broker's clock: it
// paces commits, and decides nothing a test observes but through
// WaitPromotions.
func (b *Broker) promoteLoop() {
	p := &b.promos
	defer p.wg.Done()
	timer := time.NewTimer(promoteDelay)
	defer timer.Stop()
	for {
		select {
		case <-timer.C:
		case <-p.flush:
		case <-b.closed:
		}
		p.mu.Lock()
		batch := p.pending
		p.pending = nil
		if len(batch) == 0 {
			p.running = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		b.promoteBatch(batch)
		p.mu.Lock()
		for _, l := range batch {
			delete(p.issued, l.ID)
		}
		if len(p.pending) == 0 {
			p.running = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		timer.Reset(promoteDelay)
	}
}

// awaitingPromotion reports whether this process issued the lease and
// has not finished writing its promotion.
func (b *Broker) awaitingPromotion(id string) bool {
	p := &b.promos
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.issued[id]
	return ok
}

// promoteBatch writes ls, Issuing leases as last read, as Active.
func (b *Broker) promoteBatch(ls []Lease) {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	// A conflict means the lease was written meanwhile (renewed, or its
	// revocation began); a second conflict on the same lease is left to
	// the reconciler rather than chased.
	for round := 0; round < 2 && len(ls) > 0; round++ {
		for i := range ls {
			ls[i].State = StateActive
		}
		_, errs := b.store.UpdateLeases(ctx, ls)
		var again []Lease
		for i, err := range errs {
			switch {
			case err == nil:
			case errors.Is(err, ErrConflict):
				cur, gerr := b.store.GetLease(ctx, ls[i].ID)
				if gerr == nil && cur.State == StateIssuing {
					again = append(again, cur)
				}
			case errors.Is(err, ErrLeaseNotFound):
				// Removed: a failed issue undone, or revoked and purged.
			default:
				b.log.Debug("could not promote an issued lease; the reconciler will", "lease_id", ls[i].ID, "err", err)
			}
		}
		ls = again
	}
}

// FlushPromotions writes the promotions queued so far at once and waits
// for them (or their failure). A backup calls it first, so that the
// snapshot holds the leases issued before it as Active: restored after
// their users were dropped, they end revoked like any live lease, where an
// Issuing one would be taken for an issue that never finished and removed.
// Close calls it too.
func (b *Broker) FlushPromotions() {
	p := &b.promos
	p.mu.Lock()
	if p.flush != nil {
		select {
		case p.flush <- struct{}{}:
		default:
		}
	}
	p.mu.Unlock()
	p.wg.Wait()
}
