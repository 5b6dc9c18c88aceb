package main

import (
	"context"
	"fmt"
	"time"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// runRenew measures RenewLease (unary) and the KeepAlive stream against
// ALTER ROLE ... VALID UNTIL, at --renew-concurrency.
func (e *env) runRenew(ctx context.Context, rep *report) error {
	c, per := e.opts.renewConc, e.opts.renewPerWorker
	n := c * per
	leases, err := e.issueMany(ctx, n)
	if err != nil {
		return fmt.Errorf("renew setup: %w", err)
	}
	names, err := e.baselineUsers(ctx, "bench_r_", n)
	if err != nil {
		return fmt.Errorf("renew setup: %w", err)
	}
	defer e.cleanup(ctx, rep, leases, names)

	base := func(ctx context.Context, w, k int) error {
		_, err := e.base.Exec(ctx, renewSQL(names[w*per+k%per], time.Now().Add(time.Hour+time.Minute)))
		return err
	}
	unary := func(ctx context.Context, w, k int) error {
		_, err := e.cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: leases[w*per+k%per]})
		return err
	}
	var rb, ru, rs []result // one per round
	for r := range e.opts.rounds {
		streams, err := e.openStreams(ctx, c)
		if err != nil {
			return err
		}
		stream := func(ctx context.Context, w, k int) error {
			return streams[w].renew(leases[w*per+k%per])
		}
		phases := []func(){
			func() { rb = append(rb, closedLoop(ctx, c, e.opts.phase, base)) },
			func() { ru = append(ru, closedLoop(ctx, c, e.opts.phase, unary)) },
			func() { rs = append(rs, closedLoop(ctx, c, e.opts.phase, stream)) },
		}
		for i := range phases {
			phases[(i+r)%len(phases)]()
		}
		for _, s := range streams {
			s.close()
		}
	}
	if e.opts.profileDir != "" && e.broker != nil {
		// One more stream phase, profiled on its own.
		streams, err := e.openStreams(ctx, c)
		if err != nil {
			return err
		}
		stream := func(ctx context.Context, w, k int) error { return streams[w].renew(leases[w*per+k%per]) }
		if err := e.profile("renew-stream.pprof", func() { closedLoop(ctx, c, 2*e.opts.phase, stream) }); err != nil {
			rep.note("profile: %v", err)
		}
		for _, s := range streams {
			s.close()
		}
	}
	errNote(rep, "renew baseline", mergeAll(rb))
	errNote(rep, "renew unary", mergeAll(ru))
	errNote(rep, "renew stream", mergeAll(rs))
	sc := fmt.Sprintf("renew c=%d", c)
	rep.add(tputLatencyRows(sc+" stream", rs, rb, true)...)
	rep.add(tputLatencyRows(sc+" unary", ru, rb, false)...)
	return nil
}

// keepAlive is one KeepAlive stream used closed-loop: one renewal in flight.
type keepAlive struct {
	s      pb.CredentialService_KeepAliveClient
	cancel context.CancelFunc
	last   map[string]int64 // newest expire_time seen per lease, unix ns
}

func (e *env) openStreams(ctx context.Context, n int) ([]*keepAlive, error) {
	out := make([]*keepAlive, n)
	for i := range out {
		sctx, cancel := context.WithCancel(ctx)
		s, err := e.cred.KeepAlive(sctx)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("open KeepAlive stream: %w", err)
		}
		out[i] = &keepAlive{s: s, cancel: cancel, last: map[string]int64{}}
	}
	return out, nil
}

// renew asks for one renewal and waits for the answer naming that lease
// with a later expiry than seen before (a pushed event for another lease,
// or a repeat, is skipped).
func (k *keepAlive) renew(id string) error {
	if err := k.s.Send(&pb.KeepAliveRequest{LeaseId: id}); err != nil {
		return err
	}
	for {
		resp, err := k.s.Recv()
		if err != nil {
			return err
		}
		l := resp.GetLease()
		exp := l.GetExpireTime().AsTime().UnixNano()
		if l.GetId() != id || exp <= k.last[id] {
			if l.GetId() != "" && exp > k.last[l.GetId()] {
				k.last[l.GetId()] = exp
			}
			continue
		}
		k.last[id] = exp
		switch resp.GetEvent() {
		case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_MAX_TTL_REACHED:
			return nil
		default:
			return fmt.Errorf("keepalive %s: event %s %s", id, resp.GetEvent(), resp.GetMessage())
		}
	}
}

func (k *keepAlive) close() {
	_ = k.s.CloseSend()
	k.cancel()
}
