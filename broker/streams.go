package broker

import (
	"context"
	"errors"
	"time"
)

// disconnectCheckInterval is how often leases bound to a vanished stream
// are looked for; it is also the maintenance loop's tick.
const disconnectCheckInterval = time.Second

// streamState is what the broker knows of the KeepAlive streams naming
// one lease.
type streamState struct {
	open     int       // streams naming the lease now
	bound    bool      // the lease is revoke_on_disconnect
	deadline time.Time // when a bound lease with no stream is revoked
	// failures counts revocations on disconnect that failed before they
	// began (a store error), for the backoff of the next try.
	failures int
}

// StreamOpened tells the broker that a KeepAlive stream started naming a
// lease. A revoke_on_disconnect lease lives while at least one stream names
// it, and for DisconnectGrace after the last one closed.
func (b *Broker) StreamOpened(leaseID string) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	s, ok := b.streams[leaseID]
	if !ok {
		s = &streamState{}
		b.streams[leaseID] = s
	}
	s.open++
	s.deadline = time.Time{}
	s.failures = 0
}

// StreamClosed: see StreamOpened.
func (b *Broker) StreamClosed(leaseID string) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	s, ok := b.streams[leaseID]
	if !ok {
		return
	}
	if s.open > 0 {
		s.open--
	}
	if s.open > 0 {
		return
	}
	if s.bound {
		s.deadline = b.clock.Now().Add(b.conf().DisconnectGrace)
	} else {
		delete(b.streams, leaseID)
	}
}

// armDisconnect marks a lease as bound to its streams, revoked at deadline
// unless a stream names it first.
func (b *Broker) armDisconnect(leaseID string, deadline time.Time) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	s, ok := b.streams[leaseID]
	if !ok {
		s = &streamState{}
		b.streams[leaseID] = s
	}
	s.bound = true
	if s.open == 0 {
		s.deadline = deadline
	}
}

func (b *Broker) forgetStream(leaseID string) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	if s, ok := b.streams[leaseID]; ok && s.open == 0 {
		delete(b.streams, leaseID)
	} else if ok {
		s.bound = false
	}
}

// restoreStreamDeadlines gives every live revoke_on_disconnect lease a
// fresh grace period after a restart: its client had no stream to a broker
// that was down, and deserves the chance to reconnect.
func (b *Broker) restoreStreamDeadlines(ctx context.Context) {
	deadline := b.clock.Now().Add(b.conf().DisconnectGrace)
	// The expiry index says which live leases are bound, without reading
	// the records; only a file whose entries lack the details (written by
	// an older binary) is listed the slow way.
	bare := false
	err := b.store.ScanExpiry(ctx, func(e ExpiryEntry) bool {
		if e.Username == "" {
			bare = true
			return false
		}
		if e.State == StateActive && e.RevokeOnDisconnect {
			b.armDisconnect(e.LeaseID, deadline)
		}
		return true
	})
	if err == nil && !bare {
		return
	}
	f := LeaseFilter{State: StateActive, Limit: 1000}
	for {
		page, next, err := b.store.ListLeases(ctx, f)
		if err != nil {
			b.log.Warn("could not restore revoke_on_disconnect leases", "err", err)
			return
		}
		for i := range page {
			if page[i].RevokeOnDisconnect {
				b.armDisconnect(page[i].ID, deadline)
			}
		}
		if next == "" {
			return
		}
		f.After = next
	}
}

func (b *Broker) revokeDisconnected(ctx context.Context) {
	now := b.clock.Now()
	var due []string
	b.streamsMu.Lock()
	for id, s := range b.streams {
		if s.bound && s.open == 0 && !s.deadline.IsZero() && !now.Before(s.deadline) {
			due = append(due, id)
		}
	}
	b.streamsMu.Unlock()
	for _, id := range due {
		b.log.Info("revoking lease: no KeepAlive stream within the grace period", "lease_id", id)
		l, _, err := b.revoke(ctx, id, causeDisconnect)
		switch {
		case err == nil:
			// Ended (leaseEnded forgot the stream), or it had ended already.
			b.forgetStream(id)
		case errors.Is(err, ErrLeaseNotFound):
			b.forgetStream(id)
		case l.State == StateRevoking || l.State == StateRevokeFailed:
			// Under way: revoke recorded the attempt and queued the retry
			// at its backoff, so the expiry manager owns it from here, as
			// it owns an expired lease (REVOKE_FAILED after RevokeRetries).
			// Trying again every tick would flood a target that is down.
			b.log.Warn("revoke on disconnect failed; the expiry manager retries it", "lease_id", id, "err", err)
			b.forgetStream(id)
		default:
			// Not begun (the store failed): try again after a backoff.
			b.log.Warn("revoke on disconnect failed", "lease_id", id, "err", err)
			b.disconnectRetryLater(id, now)
		}
	}
}

// disconnectRetryLater moves a bound lease's deadline to its next try.
func (b *Broker) disconnectRetryLater(id string, now time.Time) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	if s, ok := b.streams[id]; ok && s.bound && s.open == 0 {
		s.failures++
		s.deadline = now.Add(b.backoff(s.failures))
	}
}
