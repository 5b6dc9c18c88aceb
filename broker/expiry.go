package broker

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// popBatch bounds how many due leases the dispatcher takes from the queue
// at once, so that a renewal can still move a lease that is not yet handed
// to a worker.
const popBatch = 64

// startExpiryManager starts the dispatcher, which waits for the earliest
// due lease, and RevokeConcurrency workers, which revoke. Detection and
// revocation are separate so that one slow DROP does not delay the
// detection of every other expiry, and the rate limiter sits between them
// so a mass expiry cannot overload PostgreSQL.
func (b *Broker) startExpiryManager(ctx context.Context) {
	work := make(chan string)
	for i := 0; i < b.cfg.RevokeConcurrency; i++ {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case id := <-work:
					// Errors are recorded on the lease and logged by revoke;
					// the lease is already queued for its retry.
					_, _, _ = b.revoke(ctx, id, true)
				}
			}
		}()
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.dispatch(ctx, work)
	}()
}

func (b *Broker) dispatch(ctx context.Context, work chan<- string) {
	for {
		var timer <-chan time.Time
		if next, ok := b.queue.Next(); ok {
			now := b.clock.Now()
			if !next.After(now) {
				for _, id := range b.queue.PopDue(now, popBatch) {
					if err := b.limiter.Wait(ctx); err != nil {
						return
					}
					select {
					case work <- id:
					case <-ctx.Done():
						return
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

// maintenanceLoop settles intents and unknown users, purges old tombstones,
// and revokes leases whose streams went away.
func (b *Broker) maintenanceLoop(ctx context.Context) {
	nextReconcile := b.clock.Now().Add(b.cfg.ReconcileInterval)
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.clock.After(disconnectCheckInterval):
		}
		b.revokeDisconnected(ctx)
		if now := b.clock.Now(); !now.Before(nextReconcile) {
			nextReconcile = now.Add(b.cfg.ReconcileInterval)
			if _, err := b.Reconcile(ctx); err != nil && !errors.Is(err, context.Canceled) {
				b.log.Warn("reconciliation incomplete", "err", err)
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
	cutoff := b.clock.Now().Add(-b.cfg.TombstoneRetention)
	total := 0
	for {
		n, err := b.store.PurgeTombstones(ctx, cutoff, 1000)
		total += n
		if err != nil || n < 1000 {
			return total, err
		}
	}
}

func jitter(n int64) int64 {
	if n <= 0 {
		return 0
	}
	return rand.Int64N(n)
}
