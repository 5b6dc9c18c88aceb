package broker

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Following the group. On a store several instances share (LeaseFeed),
// every instance follows the store's changes, its own included, so that:
//
//   - its expiry queue holds every live lease of the group, at its due
//     time, and whichever instance leads expires leases on time, wherever
//     they were issued or renewed;
//   - KeepAlive streams on it hear REVOKED and EXPIRED (and renewals) of
//     leases ended or renewed anywhere, through the same event hub as its
//     own changes (the hub publishes each state once, events.go);
//   - it knows which leases are revoke_on_disconnect and which have a
//     stream on another instance (stream marks), so that when it leads it
//     revokes those whose last stream closed anywhere, or whose instance
//     died (streams.go);
//   - the lifecycle watchers (quota counts, the leases gauge) hear of
//     leases issued and ended elsewhere (AuditEvent.Remote).
//
// The feed reports states in revision order, but they may reach this
// broker after its own newer writes of the same lease. Every effect is
// therefore safe to apply late: an expiry entry that is too early costs a
// store read (revoke reads the lease and reschedules it), a state
// published late is dropped by the hub, and counts are kept by lease id
// with ended leases remembered (server/leasecount.go).

// revokeTakeover is how long the leader leaves a revocation that another
// instance began (a lease REVOKING with no retry scheduled: an admin's
// RevokeLease served elsewhere) to that instance before it takes it over,
// in case that instance died mid-way. A revocation takes milliseconds to
// seconds; its retries are scheduled in the lease (NextAttempt).
const revokeTakeover = 30 * time.Second

// feedState is what the change feed told this broker: the live leases it
// reported (to tell, at a reset, which ended in a gap), and whether the
// first reset has arrived.
type feedState struct {
	mu    sync.Mutex
	live  map[string]feedLease
	ready chan struct{} // closed at the first reset
	once  sync.Once
}

type feedLease struct {
	state LeaseState
}

// feedKnowsUsable reports whether the feed told of lease id as usable
// (Active or Issuing), and so queued it at its expiry.
func (b *Broker) feedKnowsUsable(id string) bool {
	b.feed.mu.Lock()
	defer b.feed.mu.Unlock()
	fl, ok := b.feed.live[id]
	return ok && fl.state.Usable()
}

func (f *feedState) init() {
	f.live = make(map[string]feedLease)
	f.ready = make(chan struct{})
}

// startFollowing starts following the store's changes if it has a feed,
// and waits (bounded by ctx) for the first reset, so the broker starts
// with the whole group's leases.
func (b *Broker) startFollowing(ctx, loopCtx context.Context) error {
	feed, ok := b.store.(LeaseFeed)
	if !ok {
		return nil
	}
	done := make(chan error, 1)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		err := feed.FollowLeases(loopCtx, b.applyFeed)
		if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, ErrClosed) {
			b.log.Error("stopped following the store's changes", "err", err)
		}
		done <- err
	}()
	select {
	case <-b.feed.ready:
		return nil
	case err := <-done:
		if err == nil {
			err = errors.New("the feed ended before its first reset")
		}
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// applyFeed applies one event of the change feed. It runs on the feed's
// goroutine, one event at a time.
func (b *Broker) applyFeed(ev FeedEvent) {
	switch ev.Kind {
	case FeedReset:
		b.applyReset(ev)
	case FeedLease:
		if ev.Lease.State.Live() {
			b.applyLive(ev.Lease, false)
		} else if ev.Lease.State.Terminal() {
			b.applyEnded(ev.Lease)
		}
	case FeedLeaseDeleted:
		b.applyGone(ev.LeaseID)
	case FeedStreamOpen, FeedStreamClosed:
		if ev.Stream.Instance != b.cfg.Instance {
			b.remoteStream(ev.Stream.LeaseID, ev.Stream.Instance, ev.Kind == FeedStreamOpen)
		}
	}
}

// applyReset replaces what the feed told before: the live leases are
// (re)applied, and a lease reported live before but missing now ended or
// went in a gap of the feed, so it is read from the store.
func (b *Broker) applyReset(ev FeedEvent) {
	now := make(map[string]bool, len(ev.Leases))
	for _, l := range ev.Leases {
		now[l.ID] = true
		b.applyLive(l, true)
	}
	b.feed.mu.Lock()
	var gone []string
	for id := range b.feed.live {
		if !now[id] {
			gone = append(gone, id)
		}
	}
	b.feed.mu.Unlock()
	for _, id := range gone {
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		l, err := b.store.GetLease(ctx, id)
		cancel()
		switch {
		case err == nil && l.State.Terminal():
			b.applyEnded(l)
		case err == nil:
			b.applyLive(l, false) // live again after the scan
		case errors.Is(err, ErrLeaseNotFound):
			b.applyGone(id)
		default:
			// Left as it is: its expiry entry makes the leader read it,
			// and the next change or reset settles it.
			b.log.Warn("could not read a lease that ended in a gap of the store's change feed", "lease_id", id, "err", err)
		}
	}
	b.resetRemoteStreams(ev.Streams)
	b.log.Info("following the store's changes", "revision", ev.Revision, "live_leases", len(ev.Leases), "stream_marks", len(ev.Streams))
	b.feed.once.Do(func() { close(b.feed.ready) })
}

// applyLive applies a live lease: its expiry entry, its disconnect
// binding, a renewal for its subscribers, and, the first time it is seen
// active, an issue for the watchers.
func (b *Broker) applyLive(l Lease, atReset bool) {
	now := b.wallNow()
	due := l.ExpireTime
	if !l.State.Usable() {
		switch {
		case !l.NextAttempt.IsZero():
			due = l.NextAttempt
		case atReset:
			// Begun by an instance that may be gone: go on at once, as
			// at a start.
			if !l.EndTime.IsZero() && l.EndTime.Before(due) {
				due = l.EndTime
			}
		default:
			due = now.Add(revokeTakeover)
		}
	}
	b.queue.Set(l.ID, due)
	b.queue.SetTarget(l.ID, l.Target)
	if l.State.Usable() && l.RevokeOnDisconnect {
		b.armDisconnectOnce(l.ID, b.clock.Now().Add(b.conf().DisconnectGrace))
	}

	b.feed.mu.Lock()
	prev, known := b.feed.live[l.ID]
	b.feed.live[l.ID] = feedLease{state: l.State}
	b.feed.mu.Unlock()

	switch {
	case l.State.Usable() && !known:
		b.notify(AuditIssue, l, "", "", true)
	case l.State == StateRevokeFailed && prev.state != StateRevokeFailed:
		b.notify(AuditRevokeFailed, l, l.LastError, "", true)
	}
	// The promotion of an Issuing lease (promote.go) changes nothing a
	// subscriber sees: no event for it.
	promoted := prev.state == StateIssuing && l.State == StateActive
	if l.State.Usable() && known && !atReset && !promoted {
		t := EventRenewed
		if !l.ExpireTime.Before(l.MaxExpireTime) {
			t = EventMaxTTLReached
		}
		b.hub.send(Event{Type: t, Lease: l.Clone()}, true)
	}
}

// applyEnded applies a lease that was revoked or expired.
func (b *Broker) applyEnded(l Lease) {
	b.queue.Remove(l.ID)
	b.forgetStream(l.ID)
	b.feed.mu.Lock()
	delete(b.feed.live, l.ID)
	b.feed.mu.Unlock()
	ev, action, reason := EventRevoked, AuditRevoke, ReasonRevoked
	if l.State == StateExpired {
		ev, action, reason = EventExpired, AuditExpire, ReasonExpired
	}
	b.hub.send(Event{Type: ev, Lease: l.Clone()}, true)
	b.notify(action, l, "", reason, true)
}

// applyGone applies a lease record that was deleted (purged, or deleted
// while live by an admin's tool): it is nothing any more.
func (b *Broker) applyGone(id string) {
	b.feed.mu.Lock()
	_, wasLive := b.feed.live[id]
	delete(b.feed.live, id)
	b.feed.mu.Unlock()
	if !wasLive {
		return // a tombstone purged: it left the queue when it ended
	}
	b.queue.Remove(id)
	b.forgetStream(id)
	b.hub.send(Event{Type: EventNotFound, Lease: Lease{ID: id}}, true)
	b.notify(AuditRevoke, Lease{ID: id}, "", ReasonRevoked, true)
}
