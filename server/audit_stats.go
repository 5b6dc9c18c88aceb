package server

import (
	"context"
	"sync/atomic"

	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/audit"
)

// auditStats is a grpc stats.Handler that records the calls grpc-go ends
// before any interceptor runs, which the audit interceptors never see: a
// request larger than MaxRecvMsgSize (ResourceExhausted) or one that does
// not decode, such as a string field that is not valid UTF-8 (Internal).
// The audit interceptors mark every call they see; a call that ends
// unmarked is recorded here, with its method, peer and status. It has no
// identity: authentication runs in the interceptors.
type auditStats struct{ c *core }

// statsCall is the mark the audit interceptors set on a call.
type statsCall struct {
	method string
	seen   atomic.Bool
}

type statsCallKey struct{}

// markAudited tells auditStats that the interceptors record the call.
func markAudited(ctx context.Context) {
	if sc, ok := ctx.Value(statsCallKey{}).(*statsCall); ok {
		sc.seen.Store(true)
	}
}

func (h auditStats) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	if auditExempt(info.FullMethodName) {
		return ctx
	}
	return context.WithValue(ctx, statsCallKey{}, &statsCall{method: info.FullMethodName})
}

func (h auditStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	end, ok := s.(*stats.End)
	if !ok {
		return
	}
	sc, ok := ctx.Value(statsCallKey{}).(*statsCall)
	if !ok || sc.seen.Load() {
		return
	}
	st := status.Convert(end.Error)
	rec := audit.Record{Event: audit.EventRequest, Method: sc.method, Peer: peerAddr(ctx),
		Code: st.Code().String(), Outcome: outcomeOf(st.Code())}
	if end.Error != nil {
		rec.Message = st.Message()
	}
	// The call is over: a record that cannot be written is logged, even
	// under audit.required.
	_ = h.c.record(rec)
}

func (auditStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (auditStats) HandleConn(context.Context, stats.ConnStats)                       {}
