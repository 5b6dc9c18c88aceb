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
// one lease: its own, and those other instances of its group hold (their
// stream marks, from the store's change feed), so that the instance that
// leads revokes a revoke_on_disconnect lease only when no instance has a
// stream naming it.
type streamState struct {
	open     int             // this instance's streams naming the lease now
	remote   map[string]bool // other instances with a stream naming it
	bound    bool            // the lease is revoke_on_disconnect
	deadline time.Time       // when a bound lease with no stream is revoked
	// failures counts revocations on disconnect that failed before they
	// began (a store error), for the backoff of the next try.
	failures int
}

// connected reports whether any instance has a stream naming the lease.
func (s *streamState) connected() bool { return s.open > 0 || len(s.remote) > 0 }

// StreamOpened tells the broker that a KeepAlive stream started naming a
// lease. A revoke_on_disconnect lease lives while at least one stream names
// it, and for DisconnectGrace after the last one closed.
//
// On a store that several instances share (StreamMarker), the first stream
// of this instance naming the lease is also marked in the store, for the
// instance that leads; the mark goes with the last stream, or with this
// instance's session if it dies.
func (b *Broker) StreamOpened(leaseID string) {
	b.streamsMu.Lock()
	s, ok := b.streams[leaseID]
	if !ok {
		s = &streamState{}
		b.streams[leaseID] = s
	}
	s.open++
	s.deadline = time.Time{}
	s.failures = 0
	first := s.open == 1
	b.streamsMu.Unlock()
	if first {
		b.markStream(leaseID, true)
	}
}

// StreamClosed: see StreamOpened.
func (b *Broker) StreamClosed(leaseID string) {
	b.streamsMu.Lock()
	s, ok := b.streams[leaseID]
	if !ok {
		b.streamsMu.Unlock()
		return
	}
	if s.open > 0 {
		s.open--
	}
	last := s.open == 0
	b.disconnectedLocked(leaseID, s)
	b.streamsMu.Unlock()
	if last {
		b.markStream(leaseID, false)
	}
}

// disconnectedLocked starts the grace period of a bound lease no instance
// has a stream for, and forgets an unbound one; b.streamsMu is held.
func (b *Broker) disconnectedLocked(leaseID string, s *streamState) {
	if s.connected() {
		return
	}
	if s.bound {
		if s.deadline.IsZero() {
			s.deadline = b.clock.Now().Add(b.conf().DisconnectGrace)
		}
	} else {
		delete(b.streams, leaseID)
	}
}

// markStreamTimeout bounds one write of a stream mark; the store retries
// a failed one by itself.
const markStreamTimeout = 10 * time.Second

// markStream writes or removes this instance's stream mark of a lease, on
// a store that keeps them.
func (b *Broker) markStream(leaseID string, open bool) {
	m, ok := b.store.(StreamMarker)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), markStreamTimeout)
	defer cancel()
	var err error
	if open {
		err = m.MarkStream(ctx, b.cfg.Instance, leaseID)
	} else {
		err = m.UnmarkStream(ctx, b.cfg.Instance, leaseID)
	}
	if err != nil {
		b.log.Warn("could not record a KeepAlive stream in the store; it retries", "lease_id", leaseID, "open", open, "err", err)
	}
}

// remoteStream records another instance's stream mark of a lease (from
// the change feed).
func (b *Broker) remoteStream(leaseID, instance string, open bool) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	s, ok := b.streams[leaseID]
	if !ok {
		if !open {
			return
		}
		s = &streamState{}
		b.streams[leaseID] = s
	}
	if open {
		if s.remote == nil {
			s.remote = make(map[string]bool)
		}
		s.remote[instance] = true
		s.deadline = time.Time{}
		s.failures = 0
		return
	}
	delete(s.remote, instance)
	b.disconnectedLocked(leaseID, s)
}

// armDisconnect marks a lease as bound to its streams, revoked at deadline
// unless a stream names it first.
func (b *Broker) armDisconnect(leaseID string, deadline time.Time) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	b.armDisconnectLocked(leaseID, deadline)
}

func (b *Broker) armDisconnectLocked(leaseID string, deadline time.Time) {
	s, ok := b.streams[leaseID]
	if !ok {
		s = &streamState{}
		b.streams[leaseID] = s
	}
	s.bound = true
	if !s.connected() {
		s.deadline = deadline
	}
}

// armDisconnectOnce is armDisconnect for a lease the change feed reports:
// a lease already known as bound keeps its deadline (the feed reports
// every renewal of it).
func (b *Broker) armDisconnectOnce(leaseID string, deadline time.Time) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	if s, ok := b.streams[leaseID]; ok && s.bound {
		return
	}
	b.armDisconnectLocked(leaseID, deadline)
}

func (b *Broker) forgetStream(leaseID string) {
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	if s, ok := b.streams[leaseID]; ok && !s.connected() {
		delete(b.streams, leaseID)
	} else if ok {
		s.bound = false
	}
}

// resetRemoteStreams replaces every other instance's stream marks with
// marks (a reset of the change feed).
func (b *Broker) resetRemoteStreams(marks []StreamMark) {
	want := make(map[string]map[string]bool)
	for _, m := range marks {
		if m.Instance == b.cfg.Instance {
			continue
		}
		if want[m.LeaseID] == nil {
			want[m.LeaseID] = make(map[string]bool)
		}
		want[m.LeaseID][m.Instance] = true
	}
	b.streamsMu.Lock()
	defer b.streamsMu.Unlock()
	for id, s := range b.streams {
		if len(s.remote) > 0 && want[id] == nil {
			s.remote = nil
			b.disconnectedLocked(id, s)
		}
	}
	for id, set := range want {
		s, ok := b.streams[id]
		if !ok {
			s = &streamState{}
			b.streams[id] = s
		}
		s.remote = set
		s.deadline = time.Time{}
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
		if e.State.Usable() && e.RevokeOnDisconnect {
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
		if s.bound && !s.connected() && !s.deadline.IsZero() && !now.Before(s.deadline) {
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
	if s, ok := b.streams[id]; ok && s.bound && !s.connected() {
		s.failures++
		s.deadline = now.Add(b.backoff(s.failures))
	}
}
