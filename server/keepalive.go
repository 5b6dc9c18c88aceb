package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// KeepAlive serves one bidirectional renewal stream.
//
// Three kinds of goroutine share a stream:
//   - the receiver reads requests and hands each to a goroutine of its
//     own that answers it (renew, or why not), at most maxStreamInflight
//     at once: a client renewing many leases on one stream (a Client
//     shares one stream among all its Keepers, and names every lease again
//     after a reconnect) gets them renewed together, in the broker's
//     batches, not one after the other. A client that sends faster than
//     the database renews is slowed down by its own stream; past
//     maxKeepAliveInflight requests in progress on all streams, every
//     stream waits;
//   - one forwarder per named lease moves the broker's events
//     (broker.Subscribe) into the outbox. It never blocks: the broker's
//     publisher must not wait for a client. A stream names at most
//     maxStreamLeases leases and all streams together maxKeepAliveLeases,
//     so the forwarders are bounded; one more lease answers
//     ResourceExhausted and the stream goes on;
//   - the handler goroutine itself is the only sender. It drains the
//     outbox, where each lease has one pending slot and the newest state
//     wins, so a slow reader costs at most one message per lease.
//
// Every answer names its lease in KeepAliveResponse.lease (at least the
// id), because answers do not come back in request order. An error that is
// not a lifecycle event (the database is down, an invalid increment, too
// many leases on the stream) is answered with event UNSPECIFIED, the last
// known lease, and a message "<Code>: <reason>"; the stream stays open so
// the other leases on it keep being renewed. A malformed or unknown lease
// id, or one that belongs to another client, answers NOT_FOUND.
//
// The stream ends when the client closes its side (after every answer is
// sent), when it is cancelled, or when the server drains (Unavailable).
// Then every lease it named is unsubscribed and reported to
// broker.StreamClosed, which starts the disconnect grace period of
// revoke_on_disconnect leases.
func (s *credentialServer) KeepAlive(stream grpc.BidiStreamingServer[pb.KeepAliveRequest, pb.KeepAliveResponse]) error {
	id, err := identity(stream.Context())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(stream.Context())

	k := &keepAliveStream{
		core:   s.core,
		ctx:    ctx,
		id:     id,
		leases: make(map[string]*namedLease),
		out:    newOutbox(),
		slots:  make(chan struct{}, maxStreamInflight),
	}
	// Cancel first: broker calls still running for the stream stop, and the
	// forwarders are already on their way out when closeAll waits for them.
	defer func() {
		cancel()
		k.mu.Lock()
		k.stopping = true // no handler starts after this
		k.mu.Unlock()
		k.handlers.Wait() // broker calls on the stream's context end at once
		k.closeAll()
	}()

	recvDone := make(chan error, 1) // buffered: the receiver may outlive the handler
	go k.receive(stream, recvDone)

	for {
		select {
		case <-k.out.ready:
			if err := k.flush(stream); err != nil {
				return err
			}
		case err := <-recvDone:
			if err != nil {
				return err
			}
			// The client closed its side. Every request it sent has been
			// answered into the outbox (the receiver handles requests in
			// order before reading the next), so send what is pending and
			// finish.
			return k.flush(stream)
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-s.draining:
			return status.Error(codes.Unavailable, "server is shutting down")
		}
	}
}

// keepAliveStream is the state of one KeepAlive stream.
type keepAliveStream struct {
	*core
	// ctx is cancelled when the handler returns; broker calls made for the
	// stream use it, so they stop with the stream.
	ctx context.Context
	id  Identity
	out *outbox

	mu     sync.Mutex
	closed bool
	leases map[string]*namedLease // the leases this stream keeps alive
	named  int                    // how many leases the stream ever named, for the log

	// nameMu makes naming a lease one at a time, so that two requests for
	// a new lease, handled at once, subscribe to it once.
	nameMu sync.Mutex

	slots    chan struct{} // maxStreamInflight: requests being handled
	handlers sync.WaitGroup
	stopping bool // under mu: the handler is returning, start no handler

	forwarders sync.WaitGroup
}

// namedLease is one lease the stream keeps alive.
type namedLease struct {
	unsubscribe func()
	stop        chan struct{} // closed to stop the lease's forwarder
}

func (k *keepAliveStream) receive(stream grpc.BidiStreamingServer[pb.KeepAliveRequest, pb.KeepAliveResponse], done chan<- error) {
	defer func() {
		// A panic here would kill the whole broker: recover, answer
		// Internal on the stream, and let the handler clean up.
		if r := recover(); r != nil {
			k.logPanic(k.ctx, "KeepAlive receiver", r)
			done <- status.Error(codes.Internal, internalMessage)
		}
	}()
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			// Every request the client sent is answered into the outbox
			// before the handler flushes and ends the stream.
			k.handlers.Wait()
			done <- nil
			return
		}
		if err != nil {
			done <- err
			return
		}
		// Backpressure: a client that sends but does not read is made to
		// wait here, rather than the outbox growing without bound.
		if err := k.out.waitForRoom(k.ctx, k.maxStreamLeases); err != nil {
			done <- status.FromContextError(err).Err()
			return
		}
		select {
		case k.slots <- struct{}{}:
		case <-k.ctx.Done():
			done <- status.FromContextError(k.ctx.Err()).Err()
			return
		}
		select {
		case k.keepAliveSlots <- struct{}{}:
		case <-k.ctx.Done():
			<-k.slots
			done <- status.FromContextError(k.ctx.Err()).Err()
			return
		}
		k.mu.Lock()
		if k.stopping {
			k.mu.Unlock()
			<-k.keepAliveSlots
			<-k.slots
			done <- status.FromContextError(context.Canceled).Err()
			return
		}
		k.handlers.Add(1)
		k.mu.Unlock()
		go k.handleOne(req)
	}
}

// maxStreamInflight bounds the requests of one stream handled at once, and
// maxKeepAliveInflight those of all streams: when the broker renews more
// slowly than clients ask, the wait stays with the clients (their streams
// are not read) instead of piling up as goroutines here.
const (
	maxStreamInflight    = 64
	maxKeepAliveInflight = 1024
)

// handleOne answers one request in a goroutine of its own.
func (k *keepAliveStream) handleOne(req *pb.KeepAliveRequest) {
	defer func() {
		if r := recover(); r != nil {
			// One request's panic must not kill the broker, nor the
			// stream's other leases: answer it Internal.
			k.logPanic(k.ctx, "KeepAlive handler", r)
			k.out.put(req.GetLeaseId(), &pb.KeepAliveResponse{
				Lease:   &pb.Lease{Id: req.GetLeaseId()},
				Event:   pb.KeepAliveEvent_KEEP_ALIVE_EVENT_UNSPECIFIED,
				Message: codes.Internal.String() + ": " + internalMessage,
			}, 0, false)
		}
		<-k.keepAliveSlots
		<-k.slots
		k.handlers.Done()
	}()
	k.handle(req)
}

// handle answers one request.
func (k *keepAliveStream) handle(req *pb.KeepAliveRequest) {
	leaseID := req.GetLeaseId()
	if err := broker.ValidateLeaseID(leaseID); err != nil {
		k.out.put(leaseID, &pb.KeepAliveResponse{
			Lease:   &pb.Lease{Id: leaseID},
			Event:   pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND,
			Message: statusText(invalidLeaseID(err)),
		}, 0, false)
		return
	}
	inc, err := durationFromProto(req.GetIncrement(), "increment")
	if err != nil {
		// Not authorized yet: say nothing about the lease but its id.
		k.answerError(leaseID, broker.Lease{ID: leaseID}, err)
		return
	}
	if !k.name(leaseID) {
		return
	}
	l, err := k.broker.Renew(k.ctx, leaseID, inc)
	if err != nil {
		k.answerRenewError(leaseID, l, err)
		return
	}
	k.out.put(leaseID, &pb.KeepAliveResponse{Lease: leaseToProto(l), Event: renewedEvent(l)}, l.Revision, false)
}

// name makes sure the stream keeps leaseID alive: the first time the
// stream names a lease, it is authorized, counted against the stream's
// limit, subscribed to and reported to broker.StreamOpened. It answers the
// client itself and returns false when the lease cannot be named.
func (k *keepAliveStream) name(leaseID string) bool {
	// Ownership never changes: authorized once is authorized for the life
	// of the stream. A closed stream names nothing.
	if known, _, closed := k.known(leaseID); known || closed {
		return !closed
	}
	k.nameMu.Lock()
	defer k.nameMu.Unlock()
	// Named meanwhile by another request of this stream?
	known, count, closed := k.known(leaseID)
	if known || closed {
		return !closed
	}

	l, err := k.broker.Lookup(k.ctx, leaseID)
	if err == nil {
		if err = k.authz.AuthorizeLease(k.id, l); err != nil {
			// Answered as unknown, like the unary calls (see authorizedLease).
			k.log.LogAttrs(k.ctx, slog.LevelWarn, "KeepAlive names a lease of another client",
				slog.String("identity", k.id.Name), slog.String("lease_id", leaseID))
			k.noteDenied(k.ctx, leaseID, l.Role)
			err = broker.ErrLeaseNotFound
		}
	}
	switch {
	case errors.Is(err, broker.ErrLeaseNotFound):
		k.answerRenewError(leaseID, broker.Lease{ID: leaseID}, err)
		return false
	case err != nil:
		k.answerError(leaseID, broker.Lease{ID: leaseID}, err)
		return false
	}
	if count >= k.maxStreamLeases {
		k.answerError(leaseID, l, fmt.Errorf("this stream already keeps %d leases alive; open another stream: %w",
			count, broker.ErrResourceExhausted))
		return false
	}
	if !k.takeKeepAliveLease() {
		k.answerError(leaseID, l, fmt.Errorf("the broker already keeps %d leases alive on all streams, its maximum; renew this lease with RenewLease or retry later: %w",
			k.maxKeepAliveLeases, broker.ErrResourceExhausted))
		return false
	}

	// Subscribe before the first renewal, so that no event between the
	// two is lost.
	events, unsubscribe := k.broker.Subscribe(leaseID)
	k.broker.StreamOpened(leaseID)
	nl := &namedLease{unsubscribe: unsubscribe, stop: make(chan struct{})}

	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		unsubscribe()
		k.broker.StreamClosed(leaseID)
		k.dropKeepAliveLease()
		return false
	}
	k.leases[leaseID] = nl
	k.named++
	k.out.track(leaseID)
	k.forwarders.Add(1)
	k.mu.Unlock()

	go k.forward(leaseID, events, nl.stop)
	return true
}

// known reports whether the stream keeps leaseID alive already, how many
// leases it keeps, and whether it has closed.
func (k *keepAliveStream) known(leaseID string) (known bool, count int, closed bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, known = k.leases[leaseID]
	return known, len(k.leases), k.closed
}

// forward moves the broker's events for one lease into the outbox.
func (k *keepAliveStream) forward(leaseID string, events <-chan broker.Event, stop <-chan struct{}) {
	defer k.forwarders.Done()
	defer func() {
		if r := recover(); r != nil {
			k.logPanic(k.ctx, "KeepAlive forwarder", r)
		}
	}()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return // the broker ended the subscription (it is closing)
			}
			resp, terminal, ok := eventToProto(leaseID, ev)
			if !ok {
				continue
			}
			k.out.put(leaseID, resp, ev.Lease.Revision, true)
			if terminal {
				k.release(leaseID)
				return
			}
		case <-stop:
			return
		case <-k.ctx.Done():
			return
		}
	}
}

// release stops keeping a lease alive once it is gone for good (revoked,
// expired, unknown), so a sidecar that replaces credentials on one
// long-lived stream does not run into the stream's lease limit.
func (k *keepAliveStream) release(leaseID string) {
	k.mu.Lock()
	nl, ok := k.leases[leaseID]
	if ok {
		delete(k.leases, leaseID)
		k.out.retire(leaseID)
	}
	k.mu.Unlock()
	if !ok {
		return
	}
	close(nl.stop)
	nl.unsubscribe()
	k.broker.StreamClosed(leaseID)
	k.dropKeepAliveLease()
}

// closeAll releases every lease at the end of the stream and waits for the
// forwarders.
func (k *keepAliveStream) closeAll() {
	k.mu.Lock()
	k.closed = true
	leases := k.leases
	k.leases = nil
	named := k.named
	k.mu.Unlock()
	for leaseID, nl := range leases {
		close(nl.stop)
		nl.unsubscribe()
		k.broker.StreamClosed(leaseID)
		k.dropKeepAliveLease()
	}
	k.forwarders.Wait()
	addLogAttrs(k.ctx, slog.Int("leases_named", named))
}

// answerRenewError answers a failed renewal, or a lookup that found no
// lease. l is what the broker returned with the error, possibly empty.
// Only for leases the caller may see: it may read the lease for the answer.
func (k *keepAliveStream) answerRenewError(leaseID string, l broker.Lease, err error) {
	var event pb.KeepAliveEvent
	switch {
	case errors.Is(err, broker.ErrLeaseNotFound):
		// Always the bare id: the lease of another client must look
		// exactly like a missing one.
		k.out.put(leaseID, &pb.KeepAliveResponse{
			Lease: &pb.Lease{Id: leaseID},
			Event: pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND,
		}, 0, false)
		k.release(leaseID)
		return
	case errors.Is(err, broker.ErrLeaseRevoked):
		event = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED
	case errors.Is(err, broker.ErrLeaseExpired):
		event = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_EXPIRED
	default:
		k.answerError(leaseID, k.lastKnown(leaseID, l), err)
		return
	}
	last := k.lastKnown(leaseID, l)
	k.out.put(leaseID, &pb.KeepAliveResponse{Lease: leaseToProto(last), Event: event}, last.Revision, false)
	k.release(leaseID)
}

// answerError answers an error that is not a lifecycle event: the stream
// and the lease's subscription stay, the client may retry. l is sent as is,
// so callers pass no more than the caller may see.
func (k *keepAliveStream) answerError(leaseID string, l broker.Lease, err error) {
	st := togRPCError(err)
	if _, isStatus := status.FromError(err); !isStatus {
		level := slog.LevelWarn
		if status.Code(st) == codes.Internal {
			level = slog.LevelError
		}
		k.log.LogAttrs(k.ctx, level, "KeepAlive renewal failed",
			slog.String("identity", k.id.Name), slog.String("lease_id", leaseID), slog.String("error", err.Error()))
	}
	k.out.put(leaseID, &pb.KeepAliveResponse{
		Lease:   leaseToProto(l),
		Event:   pb.KeepAliveEvent_KEEP_ALIVE_EVENT_UNSPECIFIED,
		Message: statusText(st),
	}, 0, false)
}

// lastKnown returns l if the broker returned it with its error, else the
// lease as stored now, else just its id.
func (k *keepAliveStream) lastKnown(leaseID string, l broker.Lease) broker.Lease {
	if l.ID != "" && !l.IssueTime.IsZero() {
		return l
	}
	if cur, err := k.broker.Lookup(k.ctx, leaseID); err == nil {
		return cur
	}
	return broker.Lease{ID: leaseID}
}

// flush sends everything pending.
func (k *keepAliveStream) flush(stream grpc.BidiStreamingServer[pb.KeepAliveRequest, pb.KeepAliveResponse]) error {
	for _, resp := range k.out.drain() {
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
	return nil
}

// statusText renders a status error for KeepAliveResponse.message.
func statusText(err error) string {
	st := status.Convert(togRPCError(err))
	return st.Code().String() + ": " + st.Message()
}

// renewedEvent is RENEWED, or MAX_TTL_REACHED when the lease can grow no
// more: the client should fetch a new credential before it expires.
func renewedEvent(l broker.Lease) pb.KeepAliveEvent {
	if !l.MaxExpireTime.IsZero() && !l.ExpireTime.Before(l.MaxExpireTime) {
		return pb.KeepAliveEvent_KEEP_ALIVE_EVENT_MAX_TTL_REACHED
	}
	return pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED
}

// eventToProto converts a broker event. terminal is true when the lease is
// gone for good; ok is false for an event type this server does not know.
func eventToProto(leaseID string, ev broker.Event) (resp *pb.KeepAliveResponse, terminal, ok bool) {
	l := ev.Lease
	if l.ID == "" {
		l.ID = leaseID
	}
	resp = &pb.KeepAliveResponse{Lease: leaseToProto(l)}
	switch ev.Type {
	case broker.EventRenewed:
		resp.Event = renewedEvent(l)
	case broker.EventMaxTTLReached:
		resp.Event = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_MAX_TTL_REACHED
	case broker.EventRevoked:
		resp.Event, terminal = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED, true
	case broker.EventExpired:
		resp.Event, terminal = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_EXPIRED, true
	case broker.EventNotFound:
		resp.Event, terminal = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND, true
		resp.Lease = &pb.Lease{Id: leaseID}
	default:
		return nil, false, false
	}
	return resp, terminal, true
}
