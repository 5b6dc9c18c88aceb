package broker

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"
)

// popBatch bounds how many due leases the dispatcher takes from the queue
// at once, so that a renewal can still move a lease that is not yet handed
// to a worker. A burst is split evenly over the workers, so it also bounds
// a revocation batch (popBatch / RevokeConcurrency leases). 256 rather
// than 64: batches of 64 instead of 16 per worker took an expiry burst of
// 2,000 from 1.5x to 1.0x the time of bare DROP ROLEs (credbroker-bench).
const popBatch = 256

// startExpiryManager starts the dispatcher, which waits for the earliest
// due lease and hands it to its target's revocation lane. Detection and
// revocation are separate so that one slow DROP does not delay the
// detection of every other expiry, and the rate limiter sits between them
// so a mass expiry cannot overload PostgreSQL.
func (b *Broker) startExpiryManager(ctx context.Context) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.dispatch(ctx)
	}()
}

// dispatch hands due leases to their targets' lanes: one at a time while
// few are due, in batches (split evenly over a lane's workers) when many
// are. Every lease takes one token of the rate limiter before it is handed
// over, so the rate bounds revocations, not batches. Handing over never
// blocks, so a target whose revocations hang delays no other target's.
func (b *Broker) dispatch(ctx context.Context) {
	for {
		if leading, changed := b.leadSwitch.get(); !leading {
			// A standby keeps its queue but revokes nothing: the leader
			// does. It starts at once when it is made the leader.
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			continue
		}
		var timer <-chan time.Time
		if next, ok := b.queue.Next(); ok {
			now := b.wallNow()
			if !next.After(now) {
				due := b.queue.PopDue(now, popBatch)
				byTarget := map[string][]string{}
				var targets []string
				for _, id := range due {
					t := b.queue.Target(id)
					if _, ok := byTarget[t]; !ok {
						targets = append(targets, t)
					}
					byTarget[t] = append(byTarget[t], id)
				}
				for _, target := range targets {
					ids := byTarget[target]
					n := b.conf().RevokeConcurrency
					size := (len(ids) + n - 1) / n
					for len(ids) > 0 {
						batch := ids[:min(size, len(ids))]
						ids = ids[len(batch):]
						for range batch {
							if err := b.limiter.Wait(ctx); err != nil {
								return
							}
						}
						b.lane(target).add(ctx, b, batch)
					}
				}
				continue
			}
			timer = b.clock.After(next.Sub(now))
		}
		select {
		case <-ctx.Done():
			return
		case <-b.queue.wake:
		case <-timer:
		}
	}
}

// revokeLane runs the expiry manager's revocations of one target, with up
// to RevokeConcurrency goroutines, started while batches are pending and
// gone when none is (as the renewal batches do, batcher.go). Each target has
// its own lane, so a target that is down or slow holds only its own
// workers: a thousand expiries on an unreachable target do not delay the
// revocations on a healthy one. (Leases whose target the queue does not
// know, from a store written by an older binary, share the lane "".)
type revokeLane struct {
	mu      sync.Mutex
	pending [][]string
	running int
}

// lane is target's lane; a target not configured (any more) or unknown
// shares the lane "".
func (b *Broker) lane(target string) *revokeLane {
	if l, ok := b.lanes[target]; ok {
		return l
	}
	return b.lanes[""]
}

// newRevokeLanes returns a lane per target and the lane "".
func newRevokeLanes(dbs map[string]Database) map[string]*revokeLane {
	lanes := map[string]*revokeLane{"": {}}
	for target := range dbs {
		lanes[target] = &revokeLane{}
	}
	return lanes
}

// add queues a batch on the lane and starts a worker if it has fewer than
// RevokeConcurrency. It never blocks on a revocation. Only the dispatcher
// calls it, which is itself counted in b.wg, so wg.Add cannot race Close's
// Wait.
func (l *revokeLane) add(ctx context.Context, b *Broker, ids []string) {
	l.mu.Lock()
	l.pending = append(l.pending, ids)
	start := l.running < b.conf().RevokeConcurrency
	if start {
		l.running++
	}
	l.mu.Unlock()
	if !start {
		return
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		l.run(ctx, b)
	}()
}

// run revokes the lane's batches until none is pending or ctx ends (the
// broker is closing: what is left is rebuilt from the store at the next
// start).
func (l *revokeLane) run(ctx context.Context, b *Broker) {
	for {
		l.mu.Lock()
		if len(l.pending) == 0 || ctx.Err() != nil {
			l.running--
			l.mu.Unlock()
			return
		}
		ids := l.pending[0]
		l.pending[0] = nil
		l.pending = l.pending[1:]
		l.mu.Unlock()
		if len(ids) == 1 {
			// Errors are recorded on the lease and logged by revoke; the
			// lease is already queued for its retry.
			_, _, _ = b.revoke(ctx, ids[0], causeExpiry)
		} else {
			b.revokeBatch(ctx, ids)
		}
	}
}

// maintenanceLoop settles intents and unknown users, purges old tombstones,
// and revokes leases whose streams went away.
func (b *Broker) maintenanceLoop(ctx context.Context) {
	nextReconcile := b.clock.Now().Add(b.conf().ReconcileInterval)
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.clock.After(disconnectCheckInterval):
		}
		if !b.Leading() {
			continue
		}
		// Re-arms the dispatcher if the wall clock stepped forward.
		b.queue.WakeIfDue(b.clock.Now())
		b.revokeDisconnected(ctx)
		if now := b.clock.Now(); !now.Before(nextReconcile) {
			nextReconcile = now.Add(b.conf().ReconcileInterval)
			res, err := b.Reconcile(ctx)
			if err != nil && !errors.Is(err, context.Canceled) {
				b.log.Warn("reconciliation incomplete", "err", err)
			}
			if res.Pending > 0 && b.cfg.ReconcileConfirm < b.conf().ReconcileInterval {
				// The second sweep that may confirm them, no later than
				// needed.
				nextReconcile = now.Add(b.cfg.ReconcileConfirm)
			}
			if n, err := b.PurgeTombstones(ctx); err != nil {
				b.log.Warn("tombstone purge failed", "err", err)
			} else if n > 0 {
				b.log.Info("tombstones purged", "count", n)
			}
		}
	}
}

// PurgeTombstones removes revoked and expired leases older than the
// retention and returns how many it removed.
func (b *Broker) PurgeTombstones(ctx context.Context) (int, error) {
	cutoff := b.clock.Now().Add(-b.conf().TombstoneRetention)
	total := 0
	for {
		n, err := b.store.PurgeTombstones(ctx, cutoff, 1000)
		total += n
		if err != nil || n < 1000 {
			return total, err
		}
	}
}

// revokeBatch is revoke(ctx, id, causeExpiry) for several expired leases at once:
// the same states and events, with one store transaction per step and one
// UsersDeleter call per target. A lease the store fails to read or write
// goes back in the queue after a backoff (requeue), so no store error
// loses a revocation. What else it cannot settle plainly (a lease changed
// since read, a target without UsersDeleter, a user that could not be
// dropped) goes through revoke one lease at a time, which records
// attempts and schedules retries.
func (b *Broker) revokeBatch(ctx context.Context, ids []string) {
	ids = slices.Clone(ids)
	slices.Sort(ids) // lock in one order: no two batches deadlock
	ids = slices.Compact(ids)
	unlocks := make([]func(), 0, len(ids))
	for _, id := range ids {
		unlocks = append(unlocks, b.leaseMu.Lock(id))
	}
	var alone []string
	defer func() {
		for _, u := range unlocks {
			u()
		}
		for _, id := range alone {
			_, _, _ = b.revoke(ctx, id, causeExpiry)
		}
	}()

	now := b.wallNow()
	dbNow := map[string]time.Time{} // each target's clock, read once per batch
	var revoking []Lease
	for _, id := range ids {
		l, err := b.store.GetLease(ctx, id)
		switch {
		case errors.Is(err, ErrLeaseNotFound):
			b.queue.Remove(id)
			continue
		case err != nil:
			b.requeue(id, err)
			continue
		case l.State.Terminal():
			b.queue.Remove(id)
			continue
		case l.State.Usable() && now.Before(l.ExpireTime):
			b.queue.Set(id, l.ExpireTime) // renewed since it was queued
			continue
		case l.State.Usable() && b.heldByDatabaseClock(ctx, l, now, dbNow):
			continue
		}
		revoking = append(revoking, l)
	}

	_, failed := b.revokeLeases(ctx, revoking, causeExpiry)
	for id, err := range failed {
		if err == nil {
			alone = append(alone, id) // revoke records the attempt
		} else {
			// Out of the queue and not recorded: back in, after a
			// backoff, or the revocation is lost. Dropping a user that is
			// already gone is success.
			b.requeue(id, err)
		}
	}
}

// expiryClockSlack is how far the database's clock may be behind this
// host's before the expiry manager holds an expiry for it: more than the
// two clocks' usual disagreement, far less than any TTL.
const expiryClockSlack = time.Second

// heldByDatabaseClock reports whether l, due by this host's clock (now),
// is not yet due by its target's clock, and if so queues it again for when
// it is (this host's now plus the time left by the database's clock). The
// database's clock is the one its VALID UNTIL follows and the one every
// broker of a group shares, so a step of one host's clock (issue 11: two
// minutes on one instance) revokes nothing early; a real jump of time
// (a host suspended and resumed) moves both, and expiry follows it.
// cache holds each target's clock for this batch; a target that cannot
// tell its time (not a DatabaseClock, an error, the zero time) leaves the
// decision to this host's clock, as before.
func (b *Broker) heldByDatabaseClock(ctx context.Context, l Lease, now time.Time, cache map[string]time.Time) bool {
	if !b.cfg.CheckDatabaseClock {
		return false
	}
	dbNow, read := cache[l.Target]
	if !read {
		if db, err := b.db(l.Target); err == nil {
			if clock, ok := db.(DatabaseClock); ok {
				if t, err := clock.Now(ctx); err == nil {
					dbNow = t
				}
			}
		}
		cache[l.Target] = dbNow
		if !dbNow.IsZero() && now.Sub(dbNow) > expiryClockSlack {
			b.log.Warn("this host's clock is ahead of the database's: expiries wait for the database's clock",
				"target", l.Target, "ahead", now.Sub(dbNow).Round(time.Millisecond))
		}
	}
	if dbNow.IsZero() || !dbNow.Before(l.ExpireTime.Add(-expiryClockSlack)) {
		return false
	}
	b.queue.Set(l.ID, now.Add(l.ExpireTime.Sub(dbNow)))
	return true
}
