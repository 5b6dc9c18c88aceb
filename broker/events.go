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
type eventHub struct {
	mu   sync.Mutex
	subs map[string]map[*subscriber]struct{}
}

type subscriber struct {
	ch chan Event
}

func (h *eventHub) subscribe(id string) (<-chan Event, func()) {
	s := &subscriber{ch: make(chan Event, 1)}
	h.mu.Lock()
	if h.subs == nil {
		h.subs = make(map[string]map[*subscriber]struct{})
	}
	set, ok := h.subs[id]
	if !ok {
		set = make(map[*subscriber]struct{})
		h.subs[id] = set
	}
	set[s] = struct{}{}
	h.mu.Unlock()
	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			delete(h.subs[id], s)
			if len(h.subs[id]) == 0 {
				delete(h.subs, id)
			}
		})
	}
}

func (h *eventHub) publish(ev Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs[ev.Lease.ID] {
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
}
