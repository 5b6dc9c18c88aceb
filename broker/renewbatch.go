package broker

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Renewal batching (group commit). Sidecars renew on many streams at once;
// one PostgreSQL transaction and one bbolt commit per renewal would make
// fsyncs and round trips the broker's ceiling. So renewals that arrive
// together are committed together: per target, up to Config.RenewBatches
// goroutines (default one) each run a batch (Database.RenewUsers beside
// LeaseStore.UpdateLeases, each one transaction with per-lease results),
// and whatever arrives while they run forms the next batches. One at a
// time makes the largest batches and the fewest commits, which measured
// fastest on a small machine; more overlap the batches' waits. A lone
// renewal waits for nobody: it is a batch of one. There is no goroutine
// while nothing is pending.
//
// Linger: with several callers renewing in a closed loop (sidecars, one
// renewal in flight per stream), the callers a batch answers come back
// about a gRPC round trip later, just after the next batch has started
// with whatever was pending (often one or two). Batches then alternate
// between a few and the rest, and each pays a PostgreSQL commit and a
// store commit. So after a batch the goroutine waits, up to
// Config.RenewLinger, until as many renewals are pending as the batch it
// just committed held; the wait ends as soon as they are there. Nothing
// waits on an idle broker: a renewal that finds no batch running (and none
// just finished) starts one at once, and a batch of one is followed by no
// wait either.
//
// A lease the batch cannot handle plainly (busy under a revocation, named
// twice in one batch, not active, a compare-and-set lost, an error of its
// own user) goes back to its caller with errRenewAlone, and the caller
// renews it on the single-lease path, which owns every corner case.

// maxRenewBatch bounds one batch, so its statement and transaction stay small.
const maxRenewBatch = 256

// renewBatchTimeout bounds one batch. The batch serves many callers, so it
// runs on a context of its own rather than any one caller's.
const renewBatchTimeout = 30 * time.Second

// errRenewAlone tells Renew to take the single-lease path.
var errRenewAlone = errors.New("renew alone")

// errRenewUserAlone is errRenewAlone for a lease the batch stored but whose
// user PostgreSQL refused: the single path must bring VALID UNTIL up to
// the stored expiry (and see why it cannot) even though the lease itself
// has nothing left to extend.
var errRenewUserAlone = fmt.Errorf("%w: the user, not the lease", errRenewAlone)

type renewCall struct {
	ctx  context.Context
	id   string
	inc  time.Duration
	done chan renewResult // buffered: the caller may have gone
}

type renewResult struct {
	lease Lease
	err   error
}

// renewBatched renews one lease through its target's batch. It returns
// errRenewAlone when the caller must use the single-lease path instead.
func (b *Broker) renewBatched(ctx context.Context, id string, inc time.Duration) (Lease, error) {
	// Only a hint: it picks the target's batch, whose compare-and-set
	// (or the single path's fresh read) settles the rest (storereads.go).
	l, err := b.leaseHint(ctx, id)
	if err != nil || !l.State.Usable() {
		// Let the single path give the precise answer.
		return Lease{}, errRenewAlone
	}
	call := &renewCall{ctx: ctx, id: id, inc: inc, done: make(chan renewResult, 1)}
	if !b.renewals.add(l.Target, call, false) {
		return Lease{}, errRenewAlone // the broker is closing
	}
	select {
	case r := <-call.done:
		return r.lease, r.err
	case <-ctx.Done():
		return Lease{}, ctx.Err()
	}
}

// renewItem is one lease of a batch, locked, with its planned expiry.
type renewItem struct {
	call      *renewCall
	unlock    func()
	lease     Lease
	newExpire time.Time
	result    renewResult
}

// renewBatch renews calls, every one a lease of target, in one PostgreSQL
// and one store transaction, and answers each call.
func (b *Broker) renewBatch(target string, calls []*renewCall) {
	ctx, cancel := context.WithTimeout(context.Background(), renewBatchTimeout)
	defer cancel()
	var items []*renewItem
	defer func() {
		// Unlock before answering: a call sent back to the single path
		// needs its lease's lock.
		for _, it := range items {
			it.unlock()
		}
		for _, it := range items {
			it.call.done <- it.result
		}
	}()

	alone := renewResult{err: errRenewAlone}
	now := b.wallNow()
	for _, c := range calls {
		if err := c.ctx.Err(); err != nil {
			c.done <- renewResult{err: err}
			continue
		}
		unlock, ok := b.leaseMu.tryLock(c.id)
		if !ok {
			// A revocation holds it, or it is named twice in this batch.
			c.done <- alone
			continue
		}
		items = append(items, &renewItem{call: c, unlock: unlock, result: alone})
	}
	// One read for the batch, under the leases' locks; maybe stale
	// (storereads.go), which UpdateLeases' compare-and-set catches.
	ids := make([]string, len(items))
	for i, it := range items {
		ids[i] = it.call.id
	}
	read, readErrs, fresh := b.leaseHints(ctx, ids)
	for i, it := range items {
		l, err := read[i], readErrs[i]
		if err != nil || !l.State.Usable() || !now.Before(l.ExpireTime) || l.Target != target {
			continue
		}
		it.lease = l
		it.newExpire = b.renewedExpiry(l, now, it.call.inc)
		if !it.newExpire.After(l.ExpireTime) {
			if !fresh {
				continue // an answer without a write: the single path reads afresh
			}
			if !l.ValidUntilBehind {
				// Nothing to extend: at the cap, or asked for less than it has.
				b.publishRenewal(l)
				it.result = renewResult{lease: l.Clone()}
				continue
			}
			// The lease needs no more time, but its user's VALID UNTIL
			// does: renew the user to the lease's expiry.
			it.newExpire = l.ExpireTime
		}
	}

	var renew []*renewItem
	for _, it := range items {
		if it.result.err == errRenewAlone && it.lease.ID != "" {
			renew = append(renew, it)
		}
	}
	if len(renew) == 0 {
		return
	}
	db, err := b.db(target)
	if err != nil {
		for _, it := range renew {
			it.result = renewResult{lease: it.lease, err: err}
		}
		return
	}

	// PostgreSQL and the store at once: each commit waits on its own
	// fsync, and one after the other they made a renewal cost both. The
	// single path goes PostgreSQL first, so that a failed store write
	// leaves VALID UNTIL merely later than the lease; here a failed
	// PostgreSQL write can also leave the lease later than VALID UNTIL.
	// Neither gives more than the caller was entitled to: the lease's
	// expiry, which revocation follows, is what it asked for, and VALID
	// UNTIL is a safety net for when the broker is down (DESIGN.md). That
	// net must still end at or after the lease: a lease stored without
	// its VALID UNTIL is marked ValidUntilBehind, and the next renewal
	// renews its user even when the lease has nothing left to extend.
	reqs := make([]RenewUserRequest, len(renew))
	ls := make([]Lease, len(renew))
	for i, it := range renew {
		reqs[i] = RenewUserRequest{Username: it.lease.Username, ValidUntil: it.newExpire.Add(b.conf().ValidUntilGrace)}
		ls[i] = it.lease
		ls[i].ExpireTime = it.newExpire
		ls[i].ValidUntilBehind = false // set again below if PostgreSQL refuses
	}
	dbDone := make(chan []error, 1)
	go func() { dbDone <- db.RenewUsers(ctx, reqs) }()
	stored, storeErrs := b.store.UpdateLeases(ctx, ls)
	dbErrs := <-dbDone
	b.markValidUntilBehind(ctx, stored, storeErrs, dbErrs)
	for i, it := range renew {
		storeErr, dbErr := storeErrs[i], dbErrs[i]
		switch {
		case errors.Is(storeErr, ErrConflict):
			// Changed since read: the single path reads it again.
			continue
		case storeErr != nil:
			it.result = renewResult{lease: it.lease, err: fmt.Errorf("store lease: %w", storeErr)}
			continue
		}
		// Stored: the expiry manager follows the lease, whatever the
		// database said.
		b.queue.Set(it.lease.ID, stored[i].ExpireTime)
		switch {
		case dbErr == nil:
			b.publishRenewal(stored[i])
			it.result = renewResult{lease: stored[i].Clone()}
		case errors.Is(dbErr, ErrUnavailable):
			it.result = renewResult{lease: stored[i].Clone(), err: fmt.Errorf("renew user: %w", dbErr)}
		default:
			// An error of this user alone (it was dropped behind the
			// broker's back, say): the single path decides what it means.
			it.result = renewResult{err: errRenewUserAlone}
		}
	}
}

// markValidUntilBehind records on every lease the batch stored but whose
// user PostgreSQL did not renew that its VALID UNTIL may lag (see
// Lease.ValidUntilBehind), so that no later renewal skips PostgreSQL for
// it; it updates stored in place. The lease is already stored and queued
// at its new expiry, and the user is dropped then; what could lag is only
// the safety net for when the broker is down.
func (b *Broker) markValidUntilBehind(ctx context.Context, stored []Lease, storeErrs, dbErrs []error) {
	var idx []int
	var ls []Lease
	for i := range stored {
		if storeErrs[i] == nil && dbErrs[i] != nil {
			l := stored[i]
			l.ValidUntilBehind = true
			idx = append(idx, i)
			ls = append(ls, l)
		}
	}
	if len(ls) == 0 {
		return
	}
	marked, errs := b.store.UpdateLeases(ctx, ls)
	for j, i := range idx {
		if errs[j] != nil {
			b.log.Warn("could not record that a user's VALID UNTIL lags its lease", "lease_id", ls[j].ID, "err", errs[j])
			continue
		}
		stored[i] = marked[j]
	}
}
