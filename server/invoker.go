package server

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// Invoker runs CredentialService and AdminService calls in-process, for
// front ends that speak another protocol (the Vault-compatible HTTP API):
// each call goes through the very interceptors and handlers a gRPC call
// goes through (metrics, logging, audit, recovery, authentication and the
// admin check, then the handler with its authorization and quotas), so a
// front end cannot grant what gRPC would refuse, nor skip the audit trail.
//
// It implements grpc.ClientConnInterface, so the generated clients work
// on it (pb.NewCredentialServiceClient(inv)). Errors are gRPC status
// errors, as over the wire. The caller is described by the context: see
// ContextWithCaller. Streams (KeepAlive) are not served.
//
// An Invoker does nothing until NewGRPCServer attaches it (Config.Invoker);
// before that, and when the server has no broker, calls answer Unavailable.
type Invoker struct {
	state atomic.Pointer[invokerState]
}

type invokerState struct {
	core     *core
	chain    grpc.UnaryServerInterceptor
	services map[string]invokerService
}

type invokerService struct {
	impl    any
	methods map[string]grpc.MethodDesc
}

var _ grpc.ClientConnInterface = (*Invoker)(nil)

// NewInvoker returns an Invoker to pass in Config.Invoker.
func NewInvoker() *Invoker { return &Invoker{} }

// attach makes inv serve c's services through the interceptors of a gRPC
// server, outermost first.
func (inv *Invoker) attach(c *core, interceptors []grpc.UnaryServerInterceptor) {
	st := &invokerState{core: c, chain: chainUnary(interceptors), services: map[string]invokerService{}}
	for _, s := range []struct {
		desc *grpc.ServiceDesc
		impl any
	}{
		{&pb.CredentialService_ServiceDesc, &credentialServer{core: c}},
		{&pb.AdminService_ServiceDesc, &adminServer{core: c}},
	} {
		svc := invokerService{impl: s.impl, methods: map[string]grpc.MethodDesc{}}
		for _, m := range s.desc.Methods {
			svc.methods[m.MethodName] = m
		}
		st.services[s.desc.ServiceName] = svc
	}
	inv.state.Store(st)
}

// Invoke runs one unary call. method is the full method name
// ("/credbroker.v1.CredentialService/IssueCredential"); args and reply are
// its request and response messages.
func (inv *Invoker) Invoke(ctx context.Context, method string, args, reply any, _ ...grpc.CallOption) error {
	st := inv.state.Load()
	if st == nil {
		return status.Error(codes.Unavailable, "the broker is not serving")
	}
	service, name, ok := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	svc, found := st.services[service]
	if !ok || !found {
		return status.Errorf(codes.Unimplemented, "unknown service %q", service)
	}
	md, found := svc.methods[name]
	if !found {
		return status.Errorf(codes.Unimplemented, "unknown method %q", method)
	}
	in, ok := args.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "request of %s is %T, not a message", method, args)
	}
	out, ok := reply.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "response of %s is %T, not a message", method, reply)
	}
	dec := func(v any) error {
		m, ok := v.(proto.Message)
		if !ok {
			return status.Errorf(codes.Internal, "request of %s decodes into %T", method, v)
		}
		// A copy, as a gRPC server decodes its own: a handler never
		// shares the caller's message.
		proto.Merge(m, in)
		return nil
	}
	resp, err := md.Handler(svc.impl, ctx, dec, st.chain)
	if err != nil {
		return err
	}
	if m, ok := resp.(proto.Message); ok && m != nil {
		proto.Merge(out, m)
	}
	return nil
}

// NewStream refuses: no stream is served in-process.
func (inv *Invoker) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	return nil, status.Error(codes.Unimplemented, "streams are not served in-process")
}

// Authenticate establishes the identity of the caller ctx describes with
// the server's Authenticator, for a front end's requests that map to no
// call (a Vault client looking up its own token). Its error is an
// Unauthenticated status, worded as gRPC's.
func (inv *Invoker) Authenticate(ctx context.Context) (Identity, error) {
	st := inv.state.Load()
	if st == nil {
		return Identity{}, status.Error(codes.Unavailable, "the broker is not serving")
	}
	id, err := st.core.authn.Authenticate(ctx)
	if err != nil {
		msg := err.Error()
		if s, ok := status.FromError(err); ok {
			msg = s.Message()
		}
		return Identity{}, status.Error(codes.Unauthenticated, msg)
	}
	return id, nil
}

// chainUnary is grpc.ChainUnaryInterceptor's composition, outermost first.
func chainUnary(ics []grpc.UnaryServerInterceptor) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, final grpc.UnaryHandler) (any, error) {
		var next func(i int) grpc.UnaryHandler
		next = func(i int) grpc.UnaryHandler {
			if i == len(ics) {
				return final
			}
			return func(ctx context.Context, req any) (any, error) {
				return ics[i](ctx, req, info, next(i+1))
			}
		}
		return next(0)(ctx, req)
	}
}

// Caller describes who makes an in-process call, as a gRPC server would
// see it over the wire.
type Caller struct {
	// Addr is the caller's address (the audit record's peer).
	Addr net.Addr
	// TLS is the connection's state; its verified client certificate, if
	// any, is the caller's identity as with gRPC's mutual TLS. nil for
	// plaintext.
	TLS *tls.ConnectionState
	// Token is a bearer token, "" for none. It is presented as gRPC's
	// "authorization: Bearer TOKEN" metadata.
	Token string
	// Via names the front end on the call's log line ("vault_api").
	Via string
}

type viaKey struct{}

// ContextWithCaller returns ctx carrying c the way a gRPC server's context
// carries its caller: the peer (address, TLS state) and the incoming
// metadata. Authenticators see no difference.
func ContextWithCaller(ctx context.Context, c Caller) context.Context {
	p := &peer.Peer{Addr: c.Addr}
	if p.Addr == nil {
		p.Addr = &net.TCPAddr{}
	}
	if c.TLS != nil {
		p.AuthInfo = credentials.TLSInfo{
			State:          *c.TLS,
			CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		}
	}
	ctx = peer.NewContext(ctx, p)
	md := metadata.MD{}
	if c.Token != "" {
		md.Set("authorization", "Bearer "+c.Token)
	}
	ctx = metadata.NewIncomingContext(ctx, md)
	if c.Via != "" {
		ctx = context.WithValue(ctx, viaKey{}, c.Via)
	}
	return ctx
}

type leaseRoleKey struct{}

// WithLeaseRole returns ctx for an in-process call about one lease
// (RenewLease, RevokeLease, LookupLease) whose caller also named the
// lease's role, as a Vault lease id does (<mount>/creds/<role>/<id>).
// Unless the lease is of that role, the call answers exactly as for an
// unknown lease, before it changes anything: an id under the wrong role
// is an id Vault never issued, and the answer must not tell whether a
// lease of that id exists under another role. Over the wire a caller
// cannot set it: it is a context value, not metadata.
func WithLeaseRole(ctx context.Context, role string) context.Context {
	return context.WithValue(ctx, leaseRoleKey{}, role)
}

// leaseRoleOf is the role WithLeaseRole set on ctx.
func leaseRoleOf(ctx context.Context) (string, bool) {
	r, ok := ctx.Value(leaseRoleKey{}).(string)
	return r, ok
}

// viaOf is the name of the front end of the front end of an in-process call.
func viaOf(ctx context.Context) (string, bool) {
	v, ok := ctx.Value(viaKey{}).(string)
	return v, ok
}
