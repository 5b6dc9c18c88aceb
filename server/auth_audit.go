package server

import (
	"context"
	"log/slog"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/audit"
)

// RequestAuditor receives one record per gRPC call (and one per lease a
// KeepAlive stream was refused). *audit.Log implements it.
type RequestAuditor interface {
	Record(audit.Record)
}

// auditCall is what inner layers tell the audit interceptor about a call
// beyond its status: that an authorization check said no even though the
// caller is answered NotFound (see authorizedLease).
type auditCall struct {
	method string
	peer   string
	stream bool

	mu     sync.Mutex
	denied bool
}

type auditCallKey struct{}

// noteDenied records a refused authorization check. In a unary call it
// turns the call's record into a denial; in a stream, which may go on
// to do allowed work, it writes a record of its own at once, with the
// lease's role (as the unary record has it from the call's log line), so
// that usage per role counts the denial.
func (c *core) noteDenied(ctx context.Context, leaseID, role string) {
	ac, ok := ctx.Value(auditCallKey{}).(*auditCall)
	if !ok {
		return
	}
	if !ac.stream {
		ac.mu.Lock()
		ac.denied = true
		ac.mu.Unlock()
		return
	}
	rec := audit.Record{Event: audit.EventRequest, Method: ac.method, Peer: ac.peer,
		LeaseID: loggableLeaseID(leaseID), Role: role, Outcome: audit.OutcomeDenied,
		Code: codes.PermissionDenied.String(), Message: "lease belongs to another client"}
	if id, ok := IdentityFrom(ctx); ok {
		rec.Identity = id.Name
	}
	c.auditor.Record(rec)
}

// auditExempt: health probes every few seconds would bury the trail, and
// reveal nothing.
func auditExempt(method string) bool {
	return strings.HasPrefix(method, "/"+healthpb.Health_ServiceDesc.ServiceName+"/")
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

func (c *core) unaryAudit(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if c.auditor == nil || auditExempt(info.FullMethod) {
		return handler(ctx, req)
	}
	ac := &auditCall{method: info.FullMethod, peer: peerAddr(ctx)}
	resp, err := handler(context.WithValue(ctx, auditCallKey{}, ac), req)
	c.auditRequest(ctx, ac, err)
	return resp, err
}

func (c *core) streamAudit(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if c.auditor == nil || auditExempt(info.FullMethod) {
		return handler(srv, ss)
	}
	ac := &auditCall{method: info.FullMethod, peer: peerAddr(ss.Context()), stream: true}
	ctx := context.WithValue(ss.Context(), auditCallKey{}, ac)
	err := handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
	c.auditRequest(ss.Context(), ac, err)
	return err
}

// auditRequest writes the call's record. Its fields come from the call's
// log attributes, which the handlers already restrict to validated ids and
// names (see requestAttrs); never from the request or response message.
func (c *core) auditRequest(ctx context.Context, ac *auditCall, err error) {
	code := status.Code(err)
	rec := audit.Record{Event: audit.EventRequest, Method: ac.method, Peer: ac.peer, Code: code.String(), Outcome: outcomeOf(code)}
	ac.mu.Lock()
	if ac.denied {
		rec.Outcome = audit.OutcomeDenied
	}
	ac.mu.Unlock()
	if err != nil {
		rec.Message = status.Convert(err).Message()
	}
	if rl, ok := ctx.Value(requestLogKey{}).(*requestLog); ok {
		rl.mu.Lock()
		for _, a := range rl.attrs {
			if a.Value.Kind() != slog.KindString {
				continue
			}
			switch a.Key {
			case "identity":
				rec.Identity = a.Value.String()
			case "role":
				rec.Role = a.Value.String()
			case "lease_id":
				rec.LeaseID = a.Value.String()
			case "username":
				rec.Username = a.Value.String()
			}
		}
		rl.mu.Unlock()
	}
	c.auditor.Record(rec)
}

func outcomeOf(code codes.Code) string {
	switch code {
	case codes.OK:
		return audit.OutcomeOK
	case codes.PermissionDenied, codes.Unauthenticated:
		return audit.OutcomeDenied
	case codes.ResourceExhausted:
		return audit.OutcomeQuota
	case codes.InvalidArgument:
		return audit.OutcomeInvalid
	case codes.NotFound:
		return audit.OutcomeNotFound
	}
	return audit.OutcomeError
}
