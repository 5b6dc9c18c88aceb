package server

import (
	"context"
	"slices"
	"sync"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// outbox holds what a KeepAlive stream has yet to send: one slot per lease,
// where the newest state replaces an older one. Writers never block on the
// client; the sender drains it at the client's pace.
type outbox struct {
	mu      sync.Mutex
	pending map[string]pendingResponse
	order   []string // lease ids with a pending slot, oldest first
	// sent is what was last sent per tracked (named) lease. A renewal is
	// both answered and published by the broker; sent keeps the client from
	// getting the same state twice.
	sent map[string]sentState
	// retired are the leases released after a terminal state (oldest
	// first), whose sent state is kept a while (retire).
	retired []string

	ready   chan struct{} // signalled when a slot is filled
	drained chan struct{} // signalled when the outbox was emptied
}

type pendingResponse struct {
	resp      *pb.KeepAliveResponse
	rev       uint64 // the lease's store revision; 0 when unknown
	fromEvent bool
}

type sentState struct {
	rev       uint64
	event     pb.KeepAliveEvent
	fromEvent bool
}

func newOutbox() *outbox {
	return &outbox{
		pending: make(map[string]pendingResponse),
		sent:    make(map[string]sentState),
		ready:   make(chan struct{}, 1),
		drained: make(chan struct{}, 1),
	}
}

// put fills the lease's slot. rev orders states of one lease (the store's
// revision only grows); 0 means unknown and always counts as newest.
//
// Nothing older than what the client was last sent goes out. A broker
// event (fromEvent true) is dropped unless it is newer than both what was
// sent and what is pending. An answer to a request replaces the
// slot unless the slot holds a strictly newer state, and is sent even if
// it repeats the last answer (a renewal at the max TTL changes nothing, yet
// the client asked), except when the broker's event of this very renewal
// already went out with the same state.
func (o *outbox) put(leaseID string, resp *pb.KeepAliveResponse, rev uint64, fromEvent bool) {
	o.mu.Lock()
	cur, exists := o.pending[leaseID]
	last, tracked := o.sent[leaseID]
	switch {
	case rev != 0 && rev < last.rev,
		fromEvent && rev != 0 && rev == last.rev:
		// The client already has this state or a newer one.
		o.mu.Unlock()
		return
	case !fromEvent && tracked && !exists && rev != 0 && last.fromEvent &&
		rev == last.rev && resp.GetEvent() == last.event:
		// Answered by the event; the next identical request is answered.
		last.fromEvent = false
		o.sent[leaseID] = last
		o.mu.Unlock()
		return
	case exists && rev != 0 && cur.rev != 0 && (cur.rev > rev || (fromEvent && cur.rev == rev)):
		o.mu.Unlock()
		return
	case exists && terminalEvent(cur.resp.GetEvent()) && !terminalEvent(resp.GetEvent()):
		// The lease is gone for good; that outranks any later answer
		// (say, to a malformed request) the client has not read yet.
		o.mu.Unlock()
		return
	}
	if !exists {
		o.order = append(o.order, leaseID)
	}
	o.pending[leaseID] = pendingResponse{resp: resp, rev: rev, fromEvent: fromEvent}
	o.mu.Unlock()
	notify(o.ready)
}

// drain empties the outbox and returns its responses, oldest slot first.
func (o *outbox) drain() []*pb.KeepAliveResponse {
	o.mu.Lock()
	out := make([]*pb.KeepAliveResponse, 0, len(o.order))
	for _, id := range o.order {
		p := o.pending[id]
		out = append(out, p.resp)
		if last, tracked := o.sent[id]; tracked && p.rev != 0 && p.rev >= last.rev {
			o.sent[id] = sentState{rev: p.rev, event: p.resp.GetEvent(), fromEvent: p.fromEvent}
		}
	}
	clear(o.pending)
	o.order = o.order[:0]
	o.mu.Unlock()
	notify(o.drained)
	return out
}

// track starts remembering what was sent for a lease the stream named;
// retire stops it. Only named leases are tracked, and retired ones only
// up to retiredMax, which bounds the map.
func (o *outbox) track(leaseID string) {
	o.mu.Lock()
	o.sent[leaseID] = sentState{}
	// Named again: tracked, no longer retired.
	o.retired = slices.DeleteFunc(o.retired, func(id string) bool { return id == leaseID })
	o.mu.Unlock()
}

// retiredMax is how many released leases a stream remembers what it sent.
const retiredMax = 64

// retire stops tracking a lease the stream released, once its terminal
// state (REVOKED, EXPIRED, NOT_FOUND) is sent or queued. What was sent is
// kept for the last retiredMax leases: the answer to a request the client
// made before the lease ended may come after the broker's event of that
// end (a renewal whose event went out before its answer, and which then
// found the lease revoked on another instance), and it must not reach the
// client as a second terminal state. put drops it as it drops any answer
// the event already gave, once; a later request is answered.
func (o *outbox) retire(leaseID string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.sent[leaseID]; !ok {
		return
	}
	o.retired = append(o.retired, leaseID)
	if len(o.retired) > retiredMax {
		delete(o.sent, o.retired[0])
		o.retired = o.retired[1:]
	}
}

// waitForRoom blocks while limit or more slots are pending: only the
// receiver calls it, so a client that sends without reading waits on its
// own stream and the outbox stays bounded.
func (o *outbox) waitForRoom(ctx context.Context, limit int) error {
	for {
		o.mu.Lock()
		n := len(o.pending)
		o.mu.Unlock()
		if n < limit {
			return nil
		}
		select {
		case <-o.drained:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// notify signals c without blocking; one pending signal is enough.
func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// terminalEvent reports whether an event says the lease is gone for good.
func terminalEvent(e pb.KeepAliveEvent) bool {
	switch e {
	case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED,
		pb.KeepAliveEvent_KEEP_ALIVE_EVENT_EXPIRED,
		pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND:
		return true
	}
	return false
}
