package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"
)

// Revoke drops the lease's user, ending its sessions; it returns once the
// user is gone. Revoking a revoked or expired lease returns it unchanged.
func (b *Broker) Revoke(ctx context.Context, id string) (Lease, error) {
	if err := ValidateLeaseID(id); err != nil {
		return Lease{}, err
	}
	// Revocations arriving together are run together (revokebatch.go);
	// what the batch cannot settle plainly comes back here.
	l, _, err := b.revokeBatched(ctx, id)
	if errors.Is(err, errRevokeAlone) {
		l, _, err = b.revoke(ctx, id, causeRequest)
	}
	return l, err
}

// revokeCause is who asked for a revocation.
type revokeCause int

const (
	causeRequest    revokeCause = iota // an admin or owner
	causeExpiry                        // the expiry manager
	causeDisconnect                    // no KeepAlive stream within the grace period
	causeUnused                        // no session for the role's revoke_unused_after (activity.go)
	causeReconcile                     // the reconciler found the user gone
)

// revoke runs the revocation of one lease under its lock; cause says who
// asked. It reports whether this call finished a revocation.
func (b *Broker) revoke(ctx context.Context, id string, cause revokeCause) (Lease, bool, error) {
	byExpiry := cause == causeExpiry
	unlock := b.leaseMu.Lock(id)
	defer unlock()
	l, err := b.store.GetLease(ctx, id)
	if errors.Is(err, ErrLeaseNotFound) {
		b.storeRecovered(id)
		b.queue.Remove(id)
		return Lease{}, false, err
	}
	if err != nil {
		if byExpiry {
			// The expiry manager took it out of the queue: put it back.
			b.requeue(id, err)
		}
		return Lease{}, false, err
	}
	if l.State.Terminal() {
		b.storeRecovered(id)
		b.queue.Remove(id)
		return l, false, nil
	}
	now := b.wallNow()
	if byExpiry && l.State.Usable() && now.Before(l.ExpireTime) {
		// Renewed since it was queued.
		b.storeRecovered(id)
		b.queue.Set(id, l.ExpireTime)
		return l, false, nil
	}
	if byExpiry && l.State.Usable() && b.heldByDatabaseClock(ctx, l, now, map[string]time.Time{}) {
		// Due by this host's clock, not yet by the database's (expiry.go).
		b.storeRecovered(id)
		return l, false, nil
	}
	if l.State.Usable() {
		l.State = StateRevoking
		if !byExpiry {
			// EndTime on a live lease records that an admin or owner asked
			// for it, so the tombstone says REVOKED, not EXPIRED.
			l.EndTime = now
		}
		stored, err := b.store.UpdateLease(ctx, l)
		if err != nil {
			if byExpiry {
				b.requeue(id, err)
			}
			return Lease{}, false, fmt.Errorf("store lease: %w", err)
		}
		l = stored
	}
	b.storeRecovered(id)
	log := b.log.With("lease_id", l.ID, "role", l.Role, "client", l.Client, "username", l.Username)
	db, dberr := b.db(l.Target)
	if dberr == nil {
		dberr = db.DeleteUser(ctx, DeleteUserRequest{Username: l.Username, ProxyRole: l.ProxyRole})
	}
	if dberr != nil {
		l.RevokeAttempts++
		l.LastError = dberr.Error()
		var due time.Time
		if l.RevokeAttempts >= b.conf().RevokeRetries {
			l.State = StateRevokeFailed
			due = now.Add(b.conf().FailedRetryInterval)
			log.Error("revocation failed; will retry later", "attempts", l.RevokeAttempts, "err", dberr)
		} else {
			due = now.Add(b.backoff(l.RevokeAttempts))
			log.Warn("revocation failed; retrying", "attempts", l.RevokeAttempts, "err", dberr)
		}
		l.NextAttempt = due
		if stored, err := b.store.UpdateLease(context.WithoutCancel(ctx), l); err == nil {
			l = stored
		} else {
			log.Error("could not record revocation failure", "err", err)
		}
		b.queue.Set(id, due)
		b.audit(AuditRevokeFailed, l, dberr.Error())
		return l, false, fmt.Errorf("revoke user: %w", dberr)
	}
	finishRevocation(&l, now)
	// The user is gone; record it even if the caller has given up.
	stored, err := b.store.UpdateLease(context.WithoutCancel(ctx), l)
	if errors.Is(err, ErrConflict) {
		// In a group, another instance may have finished this revocation
		// meanwhile (the leader takes over one begun elsewhere that seems
		// stuck, follow.go): then it is done, and this instance's
		// subscribers hear of it from the store's change feed.
		if cur, gerr := b.store.GetLease(context.WithoutCancel(ctx), id); gerr == nil && cur.State.Terminal() {
			b.queue.Remove(id)
			b.forgetStream(id)
			return cur.Clone(), false, nil
		}
	}
	if err != nil {
		// The lease stays live in the store, so it is tried again; dropping
		// a user that is already gone is success.
		b.requeue(id, err)
		return l, false, fmt.Errorf("store lease: %w", err)
	}
	b.leaseEnded(stored, log, cause)
	return stored.Clone(), true, nil
}

// requeue puts a lease back in the expiry queue after a store error kept
// its revocation from going on, at a backoff that grows with each
// consecutive store failure of that lease. The expiry manager took the
// lease out of the queue (PopDue), so without this a store error would
// lose the revocation until the next start, and the user and its sessions
// would live on.
func (b *Broker) requeue(id string, err error) {
	b.storeFailMu.Lock()
	b.storeFails[id]++
	n := b.storeFails[id]
	b.storeFailMu.Unlock()
	due := b.wallNow().Add(b.backoff(n))
	b.queue.Set(id, due)
	b.log.Warn("store error during revocation; will retry", "lease_id", id, "store_failures", n, "retry_at", due, "err", err)
}

// storeRecovered forgets the store failures of a lease: the store read
// and wrote it again.
func (b *Broker) storeRecovered(id string) {
	b.storeFailMu.Lock()
	delete(b.storeFails, id)
	b.storeFailMu.Unlock()
}

// backoff is the delay before retry attempt n (1-based): exponential from
// RetryBaseDelay, capped at RetryMaxDelay, with full jitter over its upper
// half so that a mass failure does not retry in lockstep.
func (b *Broker) backoff(n int) time.Duration {
	d := b.conf().RetryBaseDelay
	for i := 1; i < n && d < b.conf().RetryMaxDelay; i++ {
		d *= 2
	}
	if d > b.conf().RetryMaxDelay {
		d = b.conf().RetryMaxDelay
	}
	half := d / 2
	return half + time.Duration(jitter(int64(half)+1))
}

// finishRevocation records on l that its user is gone: a lease an admin
// or owner revoked (EndTime set when the revocation began) becomes
// REVOKED, one the expiry manager took EXPIRED, ending now; no failure is
// left pending.
func finishRevocation(l *Lease, now time.Time) {
	if l.EndTime.IsZero() {
		l.State = StateExpired
		l.EndTime = now
	} else {
		l.State = StateRevoked
	}
	l.LastError = ""
	l.RevokeAttempts = 0
	l.NextAttempt = time.Time{}
	l.Usage.Sessions = 0 // ended with the user
}

// leaseEnded does what follows a finished revocation: the lease leaves
// the queue and the stream bookkeeping, its subscribers hear of it, and it
// is logged and audited with the reason cause and its state give.
func (b *Broker) leaseEnded(stored Lease, log *slog.Logger, cause revokeCause) {
	b.queue.Remove(stored.ID)
	b.storeRecovered(stored.ID)
	b.forgetStream(stored.ID)
	ev := EventRevoked
	if stored.State == StateExpired {
		ev = EventExpired
	}
	b.hub.publish(Event{Type: ev, Lease: stored.Clone()})
	log.Info("lease ended", "state", stored.State.String())
	switch {
	case stored.State == StateExpired:
		b.auditReason(AuditExpire, stored, "", ReasonExpired)
	case cause == causeDisconnect:
		b.auditReason(AuditRevoke, stored, "", ReasonDisconnect)
	case cause == causeUnused:
		b.auditReason(AuditRevoke, stored, "", ReasonUnused)
	case cause == causeReconcile:
		b.auditReason(AuditRevoke, stored, "", ReasonReconcile)
	default:
		b.auditReason(AuditRevoke, stored, "", ReasonRevoked)
	}
}

// RevokeLeases revokes every live lease the selector matches and returns
// how many this call revoked. With several selectors a lease must match all.
func (b *Broker) RevokeLeases(ctx context.Context, sel RevokeSelector) (int, error) {
	if len(sel.IDs) == 0 && sel.Role == "" && sel.Client == "" {
		return 0, fmt.Errorf("%w: name at least one of lease_ids, role, client", ErrInvalidArgument)
	}
	for _, id := range sel.IDs {
		if err := ValidateLeaseID(id); err != nil {
			return 0, err
		}
	}
	filter := LeaseFilter{Role: sel.Role, Client: sel.Client}
	var ids []string
	if len(sel.IDs) > 0 {
		seen := make(map[string]bool, len(sel.IDs))
		for _, id := range sel.IDs {
			if seen[id] {
				continue
			}
			seen[id] = true
			l, err := b.store.GetLease(ctx, id)
			if err != nil {
				return 0, err
			}
			if filter.Match(&l) && !l.State.Terminal() {
				ids = append(ids, id)
			}
		}
	} else {
		filter.Limit = 1000
		for {
			page, next, err := b.store.ListLeases(ctx, filter)
			if err != nil {
				return 0, err
			}
			for i := range page {
				if !page[i].State.Terminal() {
					ids = append(ids, page[i].ID)
				}
			}
			if next == "" {
				break
			}
			filter.After = next
		}
	}
	return b.revokeAll(ctx, ids)
}

// revokeAll revokes ids with at most RevokeConcurrency at once.
func (b *Broker) revokeAll(ctx context.Context, ids []string) (int, error) {
	return b.revokeEach(ctx, ids, causeRequest, b.conf().RevokeConcurrency)
}

// revokeEach revokes ids for cause with at most concurrency at once and
// returns how many it revoked.
func (b *Broker) revokeEach(ctx context.Context, ids []string, cause revokeCause, concurrency int) (int, error) {
	var (
		mu    sync.Mutex
		count int
		errs  []error
		wg    sync.WaitGroup
		sem   = make(chan struct{}, concurrency)
	)
	// In batches (revokebatch.go), spread over the workers; what a batch
	// cannot settle goes through the single-lease path.
	total := len(ids)
	size := min(maxRevokeBatch, max(1, (len(ids)+concurrency-1)/concurrency))
	for len(ids) > 0 {
		batch := ids[:min(size, len(ids))]
		ids = ids[len(batch):]
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			res := make([]revokeResult, len(batch))
			if len(batch) > 1 {
				res = b.revokeTogether(ctx, batch, cause)
			} else {
				res[0].err = errRevokeAlone
			}
			for i, id := range batch {
				r := res[i]
				if errors.Is(r.err, errRevokeAlone) {
					_, r.ended, r.err = b.revoke(ctx, id, cause)
				}
				mu.Lock()
				if r.ended {
					count++
				}
				if r.err != nil && !errors.Is(r.err, ErrLeaseNotFound) {
					errs = append(errs, fmt.Errorf("lease %s: %w", id, r.err))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		return count, fmt.Errorf("revoked %d of %d leases; %d failed, first: %w", count, total, len(errs), errs[0])
	}
	return count, nil
}

func jitter(n int64) int64 {
	if n <= 0 {
		return 0
	}
	return rand.Int64N(n)
}
