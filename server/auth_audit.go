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

// CheckedAuditor is a RequestAuditor that reports its write failures, which
// Config.AuditRequired needs. *audit.Log implements it.
type CheckedAuditor interface {
	RequestAuditor
	// Write records r or says why it could not.
	Write(audit.Record) error
	// Healthy is nil when records can be written (trying once more if the
	// last write failed).
	Healthy() error
	// Watch calls fn when writes start to fail (err) and succeed again (nil).
	Watch(fn func(err error))
}

// errAuditUnavailable answers a call that cannot be audited under
// audit.required. The cause is in brokerd's log, not told to callers.
var errAuditUnavailable = status.Error(codes.Unavailable,
	"the audit log cannot be written and audit.required is set: calls are refused until it can; retry later")

// auditable refuses the call up front when the required audit log cannot
// be written.
func (c *core) auditable() error {
	if c.requiredAuditor == nil {
		return nil
	}
	if c.requiredAuditor.Healthy() != nil {
		return errAuditUnavailable
	}
	return nil
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
	markAudited(ctx)
	if err := c.auditable(); err != nil {
		return nil, err
	}
	ac := &auditCall{method: info.FullMethod, peer: peerAddr(ctx)}
	resp, err := handler(context.WithValue(ctx, auditCallKey{}, ac), req)
	if c.auditRequest(ctx, ac, err) != nil {
		// The work is done (an issued lease is left to expire unseen by
		// the caller) but not recorded: the caller gets no answer to use.
		return nil, errAuditUnavailable
	}
	return resp, err
}

func (c *core) streamAudit(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if c.auditor == nil || auditExempt(info.FullMethod) {
		return handler(srv, ss)
	}
	markAudited(ss.Context())
	if err := c.auditable(); err != nil {
		return err
	}
	ac := &auditCall{method: info.FullMethod, peer: peerAddr(ss.Context()), stream: true}
	ctx := context.WithValue(ss.Context(), auditCallKey{}, ac)
	err := handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
	if c.auditRequest(ss.Context(), ac, err) != nil {
		return errAuditUnavailable
	}
	return err
}

// auditRequest writes the call's record. Its fields come from the call's
// log attributes, which the handlers already restrict to validated ids and
// names (see requestAttrs); never from the request or response message.
// It returns an error only under audit.required, when the record could not
// be written.
func (c *core) auditRequest(ctx context.Context, ac *auditCall, err error) error {
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
	return c.record(rec)
}

// record writes rec; under audit.required it says whether that worked.
func (c *core) record(rec audit.Record) error {
	if c.requiredAuditor != nil {
		if err := c.requiredAuditor.Write(rec); err != nil {
			c.log.Error("audit record lost", "event", rec.Event, "method", rec.Method, "err", err)
			return err
		}
		return nil
	}
	c.auditor.Record(rec)
	return nil
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
