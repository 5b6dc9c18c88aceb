package credbroker

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// keepAliveMux is the one KeepAlive stream of a Client, shared by all its
// Keepers. It starts with the first watched lease and lives until Close.
// When the stream breaks (the broker restarts, the network drops) it
// reconnects with backoff and names every watched lease again, which also
// renews each of them at once. Answers come back matched by lease id, not
// in request order, and are handed to the watching inbox without blocking.
type keepAliveMux struct {
	c       *Client
	backoff Backoff

	mu        sync.Mutex
	watches   map[string]watch
	inboxes   map[*inbox]struct{} // every inbox, for connection news
	started   bool
	connected bool

	send   chan *pb.KeepAliveRequest
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

type watch struct {
	increment time.Duration
	in        *inbox
}

// sendQueue bounds requests waiting for the stream; when it is full a
// request is dropped, which is harmless: every reconnect names all leases.
const sendQueue = 1024

func newKeepAliveMux(c *Client, b Backoff) *keepAliveMux {
	ctx, cancel := context.WithCancel(context.Background())
	return &keepAliveMux{
		c: c, backoff: b,
		watches: make(map[string]watch),
		inboxes: make(map[*inbox]struct{}),
		send:    make(chan *pb.KeepAliveRequest, sendQueue),
		ctx:     ctx, cancel: cancel,
		done: make(chan struct{}),
	}
}

// register makes in receive connection news; unregister stops it.
func (m *keepAliveMux) register(in *inbox) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.inboxes[in] = struct{}{}
	if !m.started {
		m.started = true
		go m.run()
	}
}

func (m *keepAliveMux) unregister(in *inbox) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.inboxes, in)
	for id, w := range m.watches {
		if w.in == in {
			delete(m.watches, id)
		}
	}
}

// watch routes the answers about leaseID to in and names it on the stream.
func (m *keepAliveMux) watch(leaseID string, increment time.Duration, in *inbox) {
	m.mu.Lock()
	m.watches[leaseID] = watch{increment: increment, in: in}
	m.mu.Unlock()
	m.renew(leaseID, increment)
}

func (m *keepAliveMux) unwatch(leaseID string) {
	m.mu.Lock()
	delete(m.watches, leaseID)
	m.mu.Unlock()
}

// renew asks for a renewal; the answer comes to the lease's inbox.
func (m *keepAliveMux) renew(leaseID string, increment time.Duration) {
	req := &pb.KeepAliveRequest{LeaseId: leaseID}
	if increment > 0 {
		req.Increment = durationpb.New(increment)
	}
	select {
	case m.send <- req:
	default:
	}
}

// isConnected reports whether the stream is up.
func (m *keepAliveMux) isConnected() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.connected
}

func (m *keepAliveMux) close() {
	m.cancel()
	m.mu.Lock()
	started := m.started
	m.started = true // no start after close
	m.mu.Unlock()
	if started {
		<-m.done
	}
}

func (m *keepAliveMux) run() {
	defer close(m.done)
	failures := 0
	for m.ctx.Err() == nil {
		answered, err := m.serveOnce()
		if m.ctx.Err() != nil {
			return
		}
		m.setConnected(false, err)
		if answered {
			failures = 0
		}
		failures++
		d := m.backoff.delay(failures)
		m.c.log.Warn("KeepAlive stream broken; reconnecting", "err", err, "retry_in", d.Round(time.Millisecond))
		select {
		case <-time.After(d):
		case <-m.ctx.Done():
			return
		}
	}
}

// serveOnce runs one stream until it breaks. answered reports whether the
// broker answered anything on it (then the backoff starts over).
func (m *keepAliveMux) serveOnce() (answered bool, err error) {
	ctx, cancel := context.WithCancel(m.ctx)
	defer cancel()
	stream, err := m.c.cred.KeepAlive(ctx)
	if err != nil {
		return false, err
	}
	// Name every watched lease: the broker subscribes the stream to it
	// and renews it, so a lease kept across a broker restart is renewed
	// as soon as the broker is back.
	m.mu.Lock()
	hello := make([]*pb.KeepAliveRequest, 0, len(m.watches))
	for id, w := range m.watches {
		req := &pb.KeepAliveRequest{LeaseId: id}
		if w.increment > 0 {
			req.Increment = durationpb.New(w.increment)
		}
		hello = append(hello, req)
	}
	m.mu.Unlock()
	for _, req := range hello {
		if err := stream.Send(req); err != nil {
			return false, err
		}
	}

	recvErr := make(chan error, 1)
	var gotOne atomic.Bool
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			// Up once the broker answers: said before the answer is
			// handed on, so a Keeper hears "connected" first.
			if !gotOne.Swap(true) && len(hello) > 0 {
				m.setConnected(true, nil)
			}
			m.dispatch(resp)
		}
	}()
	if len(hello) == 0 {
		// Nothing to answer yet: the stream being accepted is all there is.
		m.setConnected(true, nil)
	}
	for {
		select {
		case req := <-m.send:
			if err := stream.Send(req); err != nil {
				return gotOne.Load(), err
			}
		case err := <-recvErr:
			return gotOne.Load(), err
		case <-ctx.Done():
			return gotOne.Load(), ctx.Err()
		}
	}
}

func (m *keepAliveMux) setConnected(up bool, err error) {
	m.mu.Lock()
	changed := m.connected != up
	m.connected = up
	var ins []*inbox
	if changed {
		for in := range m.inboxes {
			ins = append(ins, in)
		}
	}
	m.mu.Unlock()
	for _, in := range ins {
		in.put(streamMsg{connected: up, disconnected: !up, err: err})
	}
	if changed && up {
		m.c.log.Info("KeepAlive stream connected")
	}
}

func (m *keepAliveMux) dispatch(resp *pb.KeepAliveResponse) {
	id := resp.GetLease().GetId()
	m.mu.Lock()
	w, ok := m.watches[id]
	m.mu.Unlock()
	if ok {
		w.in.put(streamMsg{resp: resp})
	}
}

// streamMsg is what the stream tells a Keeper: an answer about a lease, or
// that the stream went down or came up.
type streamMsg struct {
	resp         *pb.KeepAliveResponse
	connected    bool
	disconnected bool
	err          error
}

// inbox is a Keeper's queue of stream messages. put never blocks: answers
// are few per lease (the broker keeps one slot per lease too), so the
// queue stays short even when the Keeper is busy issuing.
type inbox struct {
	mu    sync.Mutex
	msgs  []streamMsg
	ready chan struct{}
}

func newInbox() *inbox { return &inbox{ready: make(chan struct{}, 1)} }

func (in *inbox) put(m streamMsg) {
	in.mu.Lock()
	in.msgs = append(in.msgs, m)
	in.mu.Unlock()
	select {
	case in.ready <- struct{}{}:
	default:
	}
}

func (in *inbox) take() []streamMsg {
	in.mu.Lock()
	defer in.mu.Unlock()
	out := in.msgs
	in.msgs = nil
	return out
}
