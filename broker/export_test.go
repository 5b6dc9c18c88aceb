package broker

// PendingRenewals reports how many renewals wait for a batch.
func (b *Broker) PendingRenewals() int { return b.renewals.pendingRenewals() }
