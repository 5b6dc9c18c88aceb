package metrics

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// UnaryInterceptor counts every unary call (go-grpc-middleware's
// grpc_server_* metrics), the refused ones by reason, and times
// successful issues by role. It belongs outside every other interceptor
// (server.Config.ObserveUnary), so that it sees calls refused by
// authentication, audit and quotas too.
func (m *Metrics) UnaryInterceptor() grpc.UnaryServerInterceptor {
	inner := m.grpc.UnaryServerInterceptor()
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := inner(ctx, req, info, handler)
		m.countDenied(err)
		if err == nil && info.FullMethod == pb.CredentialService_IssueCredential_FullMethodName {
			// Only a successful issue: its role exists, so the label's
			// values are the configured roles and nothing a caller made up.
			if r, ok := req.(*pb.IssueCredentialRequest); ok {
				m.issueDuration.WithLabelValues(r.GetRole()).Observe(time.Since(start).Seconds())
			}
		}
		return resp, err
	}
}

// StreamInterceptor is UnaryInterceptor for streams, and keeps
// credbroker_keepalive_streams: a KeepAlive stream counts from when it
// arrives to when it ends (one refused by authentication, for the instant
// that takes).
func (m *Metrics) StreamInterceptor() grpc.StreamServerInterceptor {
	inner := m.grpc.StreamServerInterceptor()
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if info.FullMethod == pb.CredentialService_KeepAlive_FullMethodName {
			next := handler
			handler = func(srv any, ss grpc.ServerStream) error {
				m.keepAliveStreams.Inc()
				defer m.keepAliveStreams.Dec()
				return next(srv, ss)
			}
		}
		err := inner(srv, ss, info, handler)
		m.countDenied(err)
		return err
	}
}

// countDenied counts a call refused for who called or how much.
func (m *Metrics) countDenied(err error) {
	var reason string
	switch status.Code(err) {
	case codes.Unauthenticated:
		reason = DeniedUnauthenticated
	case codes.PermissionDenied:
		reason = DeniedPermission
	case codes.ResourceExhausted:
		reason = DeniedResourceExhausted
	default:
		return
	}
	m.denied.WithLabelValues(reason).Inc()
}
