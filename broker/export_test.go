package broker

import "time"

// PendingRenewals reports how many renewals wait for a batch.
func (b *Broker) PendingRenewals() int { return b.renewals.pendingCalls() }

// QueueLen is the number of leases in the expiry queue.
func (b *Broker) QueueLen() int { return b.queue.Len() }

// QueueNext is the earliest due time in the expiry queue.
func (b *Broker) QueueNext() (time.Time, bool) { return b.queue.Next() }

// SetRenewLingerTimer replaces the timer that bounds the renewal batches'
// linger (renewbatch.go), so a test decides when it expires.
func (b *Broker) SetRenewLingerTimer(after func(time.Duration) <-chan time.Time) {
	b.renewals.mu.Lock()
	defer b.renewals.mu.Unlock()
	b.renewals.after = after
}

// PendingRevocations reports how many requested revocations wait for a
// batch.
func (b *Broker) PendingRevocations() int { return b.revocations.pendingCalls() }

// SetRevokeBatches sets how many revocation batches one target runs at
// once (revokebatch.go's revokeBatches).
func (b *Broker) SetRevokeBatches(n int) {
	b.revocations.mu.Lock()
	defer b.revocations.mu.Unlock()
	b.revocations.slots = n
}

// SetRevokeLingerTimer replaces the timer that bounds the revocation
// batches' linger (revokebatch.go).
func (b *Broker) SetRevokeLingerTimer(after func(time.Duration) <-chan time.Time) {
	b.revocations.mu.Lock()
	defer b.revocations.mu.Unlock()
	b.revocations.after = after
}

// SetAbandonTimer replaces the timer of the pauses between a failed
// issue's cleanup tries (abandonIssue), so a test decides when each ends.
// Call it before the broker issues.
func (b *Broker) SetAbandonTimer(after func(time.Duration) <-chan time.Time) {
	b.abandonAfter = after
}

// AbandonBasePause is abandonIssue's first pause; each next one doubles.
const AbandonBasePause = abandonBasePause

// WaitPromotions waits until the issued leases queued for promotion to
// Active are written (promote.go).
func (b *Broker) WaitPromotions() { b.FlushPromotions() }
