package broker

import "time"

// PendingRenewals reports how many renewals wait for a batch.
func (b *Broker) PendingRenewals() int { return b.renewals.pendingRenewals() }

// QueueLen is the number of leases in the expiry queue.
func (b *Broker) QueueLen() int { return b.queue.Len() }

// QueueNext is the earliest due time in the expiry queue.
func (b *Broker) QueueNext() (time.Time, bool) { return b.queue.Next() }

// WaitPromotions waits until the issued leases queued for promotion to
// Active are written (promote.go).
func (b *Broker) WaitPromotions() { b.waitPromotions() }
