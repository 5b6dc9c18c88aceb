package server

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// Interceptors, outermost first: log -> audit -> recover -> authenticate.
// Logging is outermost so it sees the final code (including the Internal a
// recovered panic turns into and the Unauthenticated of a refused caller);
// audit (auth_audit.go) reads the attributes the inner layers add to the
// log line.

// requestLog collects the attributes of one call's log line. Inner layers
// (authentication, handlers) add to it through the context, so the line is
// written once, at the end, with the code and duration.
type requestLog struct {
	mu    sync.Mutex
	attrs []slog.Attr
}

type requestLogKey struct{}

// addLogAttrs adds attributes to the current call's log line. It is a no-op
// outside a call. Never pass a password or a whole message.
func addLogAttrs(ctx context.Context, attrs ...slog.Attr) {
	rl, ok := ctx.Value(requestLogKey{}).(*requestLog)
	if !ok {
		return
	}
	rl.mu.Lock()
	rl.attrs = append(rl.attrs, attrs...)
	rl.mu.Unlock()
}

// requestAttrs picks the few identifying fields of a request by their
// generated getters. It deliberately reads fields one by one: logging a
// message wholesale would one day log a password.
func requestAttrs(req any) []slog.Attr {
	var attrs []slog.Attr
	if r, ok := req.(interface{ GetLeaseId() string }); ok && r.GetLeaseId() != "" {
		attrs = append(attrs, slog.String("lease_id", loggableLeaseID(r.GetLeaseId())))
	}
	if r, ok := req.(interface{ GetRole() string }); ok && r.GetRole() != "" {
		role := r.GetRole()
		if broker.ValidateRoleName(role) != nil {
			role = invalidForLog
		}
		attrs = append(attrs, slog.String("role", role))
	}
	if r, ok := req.(interface{ GetClient() string }); ok && r.GetClient() != "" {
		attrs = append(attrs, slog.String("client", truncateForLog(r.GetClient())))
	}
	if r, ok := req.(interface{ GetLeaseIds() []string }); ok && len(r.GetLeaseIds()) > 0 {
		attrs = append(attrs, slog.Int("lease_ids", len(r.GetLeaseIds())))
	}
	return attrs
}

// invalidForLog stands in for a malformed id or name: what a caller sent
// (NUL bytes, quotes, kilobytes) is not copied into the log.
const invalidForLog = "(invalid)"

func loggableLeaseID(id string) string {
	if broker.ValidateLeaseID(id) != nil {
		return invalidForLog
	}
	return id
}

// truncateForLog bounds what a caller can make the server write to its log.
func truncateForLog(s string) string {
	const max = 128
	if len(s) <= max {
		return s
	}
	return s[:max] + "..."
}

func (c *core) unaryLog(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	rl := &requestLog{attrs: append([]slog.Attr{slog.String("method", info.FullMethod)}, requestAttrs(req)...)}
	if via, ok := viaOf(ctx); ok {
		rl.attrs = append(rl.attrs, slog.String("via", via))
	}
	resp, err := handler(context.WithValue(ctx, requestLogKey{}, rl), req)
	c.logCall(ctx, info.FullMethod, rl, start, err)
	return resp, err
}

func (c *core) streamLog(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	rl := &requestLog{attrs: []slog.Attr{slog.String("method", info.FullMethod)}}
	ctx := context.WithValue(ss.Context(), requestLogKey{}, rl)
	err := handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
	c.logCall(ss.Context(), info.FullMethod, rl, start, err)
	return err
}

func (c *core) logCall(ctx context.Context, method string, rl *requestLog, start time.Time, err error) {
	code := status.Code(err)
	rl.mu.Lock()
	attrs := append(rl.attrs[:len(rl.attrs):len(rl.attrs)],
		slog.String("code", code.String()),
		slog.Duration("duration", time.Since(start)))
	rl.mu.Unlock()
	if err != nil {
		// The status message is what the caller saw; it is safe by
		// construction (see togRPCError).
		attrs = append(attrs, slog.String("status", status.Convert(err).Message()))
	}
	c.log.LogAttrs(ctx, logLevel(method, code), "rpc", attrs...)
}

func logLevel(method string, code codes.Code) slog.Level {
	switch code {
	case codes.Internal, codes.Unknown, codes.DataLoss:
		return slog.LevelError
	case codes.Unavailable, codes.Unauthenticated, codes.PermissionDenied:
		return slog.LevelWarn
	}
	if strings.HasPrefix(method, "/"+healthpb.Health_ServiceDesc.ServiceName+"/") {
		// Probes call every few seconds; a line each would drown the log.
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

// contextStream replaces a stream's context, so handlers see what the
// interceptors put there.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }

// The recovery interceptors turn a handler's panic into codes.Internal: one
// bad request must never take down the broker and every lease it tracks.
// Goroutines a handler starts recover on their own (see keepalive.go).

func (c *core) unaryRecover(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			c.logPanic(ctx, info.FullMethod, r)
			resp, err = nil, status.Error(codes.Internal, internalMessage)
		}
	}()
	return handler(ctx, req)
}

func (c *core) streamRecover(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer func() {
		if r := recover(); r != nil {
			c.logPanic(ss.Context(), info.FullMethod, r)
			err = status.Error(codes.Internal, internalMessage)
		}
	}()
	return handler(srv, ss)
}

func (c *core) logPanic(ctx context.Context, method string, r any) {
	c.log.LogAttrs(ctx, slog.LevelError, "panic in gRPC handler",
		slog.String("method", method),
		slog.String("panic", fmt.Sprint(r)),
		slog.String("stack", string(debug.Stack())))
}

// unauthenticatedPrefixes are exempt from authentication: health probes
// (kubelet, load balancers) carry no credentials, and health reveals
// nothing but "up".
var unauthenticatedPrefixes = []string{
	"/" + healthpb.Health_ServiceDesc.ServiceName + "/",
}

var adminPrefix = "/" + pb.AdminService_ServiceDesc.ServiceName + "/"

func (c *core) unaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	ctx, err := c.authenticate(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (c *core) streamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, err := c.authenticate(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	return handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
}

// authenticate puts the caller's identity in ctx and, for AdminService,
// checks that it is an admin. Checking admin here rather than in each
// handler means an AdminService method added later is guarded without
// anyone remembering to.
func (c *core) authenticate(ctx context.Context, method string) (context.Context, error) {
	for _, p := range unauthenticatedPrefixes {
		if strings.HasPrefix(method, p) {
			return ctx, nil
		}
	}
	id, err := c.authn.Authenticate(ctx)
	if err != nil {
		msg := err.Error()
		if st, ok := status.FromError(err); ok {
			msg = st.Message()
		}
		addLogAttrs(ctx, slog.String("error", msg))
		return nil, status.Error(codes.Unauthenticated, msg)
	}
	addLogAttrs(ctx, slog.String("identity", truncateForLog(id.Name)), slog.Bool("admin", id.Admin))
	if strings.HasPrefix(method, adminPrefix) {
		if err := c.authz.AuthorizeAdmin(id); err != nil {
			return nil, c.fail(ctx, err)
		}
	}
	return ContextWithIdentity(ctx, id), nil
}

// fail maps err to a status (togRPCError) and records the real error for
// the call's log line: for an unknown error that is the only place the
// cause appears, since the caller only sees "internal error".
func (c *core) fail(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if _, isStatus := status.FromError(err); !isStatus {
		addLogAttrs(ctx, slog.String("error", err.Error()))
	}
	return togRPCError(err)
}

// identity returns the caller's identity. A handler reached without one is
// a wiring mistake (the interceptor is missing), answered, not panicked on.
func identity(ctx context.Context) (Identity, error) {
	id, ok := IdentityFrom(ctx)
	if !ok {
		return Identity{}, status.Error(codes.Unauthenticated, "no identity established")
	}
	return id, nil
}
