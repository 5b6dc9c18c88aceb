package broker

import "sync"

// Subscribe returns a channel of events for one lease; the channel holds
// at most one event, the newest. Call the returned function to unsubscribe.
func (b *Broker) Subscribe(leaseID string) (<-chan Event, func()) {
	return b.hub.subscribe(leaseID)
}

// eventHub fans lease events out to subscribers. Each subscriber has a
// one-slot channel where the newest event wins, so a slow reader never
// blocks the broker.
//
// Events come from this broker's own writes and, on a store several
// instances share, from the store's change feed, which reports this
// instance's writes too. So the hub remembers, per subscribed lease, the
// newest revision it published and whether the feed published it, and a
// state is published once: an event older than the last is dropped, and
// one at the same revision is dropped when either of the two came from
// the feed. (Two local events at one revision both go out: a renewal at
// the max TTL answers again with the same state.)
type eventHub struct {
	mu   sync.Mutex
	subs map[string]*subscription
}

type subscription struct {
	subs     map[*subscriber]struct{}
	rev      uint64 // newest revision published
	fromFeed bool   // whether the feed published it
}

type subscriber struct {
	ch chan Event
}

func (h *eventHub) subscribe(id string) (<-chan Event, func()) {
	s := &subscriber{ch: make(chan Event, 1)}
	h.mu.Lock()
	if h.subs == nil {
		h.subs = make(map[string]*subscription)
	}
	set, ok := h.subs[id]
	if !ok {
		set = &subscription{subs: make(map[*subscriber]struct{})}
		h.subs[id] = set
	}
	set.subs[s] = struct{}{}
	h.mu.Unlock()
	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			if set, ok := h.subs[id]; ok {
				delete(set.subs, s)
				if len(set.subs) == 0 {
					delete(h.subs, id)
				}
			}
		})
	}
}

// publish sends an event of this broker's own to the lease's subscribers.
func (h *eventHub) publish(ev Event) { h.send(ev, false) }

// send sends ev to the lease's subscribers unless they had its state
// already; fromFeed says it comes from the store's change feed. It
// reports whether it was sent.
func (h *eventHub) send(ev Event, fromFeed bool) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	set, ok := h.subs[ev.Lease.ID]
	if !ok {
		return false
	}
	if rev := ev.Lease.Revision; rev != 0 {
		if rev < set.rev || (rev == set.rev && (fromFeed || set.fromFeed)) {
			return false
		}
		set.rev, set.fromFeed = rev, fromFeed
	}
	for s := range set.subs {
		for {
			select {
			case s.ch <- ev:
			default:
				// Full: drop the stale event and try again; newest wins.
				select {
				case <-s.ch:
				default:
				}
				continue
			}
			break
		}
	}
	return true
}
