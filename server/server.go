package server

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// Defaults for zero Config fields.
const (
	DefaultSSLMode         = "prefer"
	DefaultMaxStreamLeases = 1000
	// DefaultMaxKeepAliveLeases bounds the leases named on all KeepAlive
	// streams together: each costs a subscription and a goroutine, and the
	// number of streams is otherwise unbounded.
	DefaultMaxKeepAliveLeases = 100_000
	// DefaultMaxPendingRenewals bounds the RenewLease calls in progress.
	DefaultMaxPendingRenewals = 1024
	// DefaultMaxRecvMsgSize bounds one request message. The largest real
	// request, RevokeLeases naming a thousand lease ids, is about 35 KiB;
	// gRPC's own default (4 MiB) would let a caller make the broker
	// decode and validate far more than any call needs.
	DefaultMaxRecvMsgSize = 256 << 10
	// DefaultMaxHeaderListSize bounds a call's metadata (headers): a
	// bearer token and tracing headers fit many times over.
	DefaultMaxHeaderListSize = 16 << 10
)

// sslModes are the sslmode values libpq accepts in a connection URI.
var sslModes = map[string]bool{
	"disable": true, "allow": true, "prefer": true,
	"require": true, "verify-ca": true, "verify-full": true,
}

// Config configures the gRPC layer. The wiring code (brokerd) fills it;
// NewGRPCServer fills defaults for zero values.
type Config struct {
	// Broker serves every CredentialService and AdminService call. Required.
	Broker *broker.Broker
	// Authenticator establishes the caller's identity. Default:
	// LocalAuthenticator, which is only safe on loopback and unix sockets.
	Authenticator Authenticator
	// Authorizer decides what an identity may do. Default: OwnerAuthorizer.
	Authorizer Authorizer
	// Logger receives one line per call. Default: discard.
	Logger *slog.Logger
	// Endpoints maps target names to where issued users connect. The broker
	// has no accessor for it, so the wiring code copies each target's
	// Database.Endpoint() here; ListRoles uses it to say which database a
	// role's credentials log in to.
	Endpoints map[string]broker.Endpoint
	// SSLMode is the sslmode written into every credential's DSN.
	// Default: "prefer".
	SSLMode string
	// MaxStreamLeases caps how many leases one KeepAlive stream may name,
	// which bounds the goroutines and memory one client can pin.
	// Default: 1000.
	MaxStreamLeases int
	// MaxKeepAliveLeases caps the leases named on all KeepAlive streams
	// together; past it, naming one more answers ResourceExhausted on the
	// stream. Default: DefaultMaxKeepAliveLeases, or MaxStreamLeases if
	// that is larger.
	MaxKeepAliveLeases int
	// MaxPendingRenewals caps the RenewLease calls in progress at once;
	// past it, RenewLease answers ResourceExhausted at once rather than
	// queue (KeepAlive streams wait instead: see keepalive.go).
	// Default: DefaultMaxPendingRenewals.
	MaxPendingRenewals int
	// Auditor, when set, receives one record per call: identity, peer,
	// role, lease id, username and outcome (see auth_audit.go).
	Auditor RequestAuditor
	// AuditRequired refuses calls that cannot be audited (audit.required):
	// while Auditor's writes fail, every call but health checks answers
	// Unavailable without being handled, and health reports NOT_SERVING
	// until a write succeeds again. Auditor must then be a CheckedAuditor.
	AuditRequired bool
	// Quotas bound active leases and the issue rate; the zero value
	// imposes none.
	Quotas Quotas
	// MaxRecvMsgSize and MaxHeaderListSize bound a request's message and
	// metadata in bytes. Defaults: DefaultMaxRecvMsgSize,
	// DefaultMaxHeaderListSize.
	MaxRecvMsgSize    int
	MaxHeaderListSize int
	// Drainer, when set, lets the owner of the server announce shutdown:
	// health turns NOT_SERVING and KeepAlive streams end. Without it the
	// server reports SERVING until it stops.
	Drainer *Drainer
	// RootRotator, when set, serves AdminService.RotateRootCredential
	// (see admin_rotate.go); without it that call is Unimplemented.
	RootRotator RootRotator
	// ConfigReloader, when set, serves AdminService.ReloadConfig, and
	// StoreBackup AdminService.BackupStore (admin_ops.go); without them
	// those calls are Unimplemented.
	ConfigReloader ConfigReloader
	StoreBackup    StoreBackup
	// LiveQuotas, when set, are the quotas in force instead of Quotas,
	// read at each issue, so a reload can replace them (quota.go).
	LiveQuotas *LiveQuotas
	// Status, when set, serves AdminService.GetStatus (admin_status.go);
	// without it that call is Unimplemented.
	Status StatusSource
	// ObserveUnary and ObserveStream, when set, run outside every other
	// interceptor, so they see every call, refused ones included
	// (metrics). They must not change a call.
	ObserveUnary  grpc.UnaryServerInterceptor
	ObserveStream grpc.StreamServerInterceptor
	// Invoker, when set, is attached to the server's services: calls
	// made through it run the same interceptors and handlers as gRPC
	// calls (see invoker.go). Not attached without a Broker.
	Invoker *Invoker
}

// Validate reports the first invalid field. NewGRPCServer cannot return an
// error, so callers that want to fail fast call Validate first.
func (c Config) Validate() error {
	if c.Broker == nil {
		return errors.New("server: Broker is required")
	}
	if c.SSLMode != "" && !sslModes[c.SSLMode] {
		return fmt.Errorf("server: invalid SSLMode %q (want disable, allow, prefer, require, verify-ca or verify-full)", c.SSLMode)
	}
	if c.MaxStreamLeases < 0 {
		return fmt.Errorf("server: MaxStreamLeases must not be negative, got %d", c.MaxStreamLeases)
	}
	if _, ok := c.Auditor.(CheckedAuditor); c.AuditRequired && !ok {
		return errors.New("server: AuditRequired needs an Auditor that reports write failures (a CheckedAuditor such as *audit.Log)")
	}
	if c.MaxKeepAliveLeases < 0 {
		return fmt.Errorf("server: MaxKeepAliveLeases must not be negative, got %d", c.MaxKeepAliveLeases)
	}
	if c.MaxPendingRenewals < 0 {
		return fmt.Errorf("server: MaxPendingRenewals must not be negative, got %d", c.MaxPendingRenewals)
	}
	return nil
}

// Drainer coordinates a graceful stop. grpc.Server.GracefulStop waits for
// every open stream to end, and a KeepAlive stream never ends by itself,
// so the owner calls Drain first:
//
//	d.Drain()                  // health NOT_SERVING, KeepAlive streams end
//	gs.GracefulStop()          // unary calls in flight finish
//
// (with a deadline, after which gs.Stop()). Clients see codes.Unavailable
// on their stream and reconnect, to another broker once there is one.
type Drainer struct {
	health *health.Server
	once   sync.Once
	done   chan struct{}
}

// NewDrainer returns a Drainer whose health service reports SERVING.
func NewDrainer() *Drainer {
	return &Drainer{health: health.NewServer(), done: make(chan struct{})}
}

// Drain marks every service NOT_SERVING, so load balancers and probes stop
// sending new calls, and ends every KeepAlive stream. It is idempotent and
// cannot be undone.
func (d *Drainer) Drain() {
	d.once.Do(func() {
		d.health.Shutdown()
		close(d.done)
	})
}

// Draining is closed once Drain has been called.
func (d *Drainer) Draining() <-chan struct{} { return d.done }

// HealthServer is the grpc.health.v1 service the Drainer controls, for
// owners that report finer states (a target unreachable) themselves.
func (d *Drainer) HealthServer() *health.Server { return d.health }

// serviceNames are the health-checked services besides "" (the server).
var serviceNames = []string{
	pb.CredentialService_ServiceDesc.ServiceName,
	pb.AdminService_ServiceDesc.ServiceName,
}

// NewGRPCServer returns a grpc.Server serving CredentialService,
// AdminService, grpc.health.v1 and server reflection, behind the logging,
// recovery and authentication interceptors. opts are appended after the
// server's own: interceptors added with grpc.ChainUnaryInterceptor run
// inside ours (after authentication); do not use grpc.UnaryInterceptor,
// which gRPC would put outside them.
//
// An invalid cfg (see Validate) does not panic: the error is logged, an
// invalid field falls back to its default, and without a Broker the two
// credbroker services are not registered (their health is NOT_SERVING).
func NewGRPCServer(cfg Config, opts ...grpc.ServerOption) *grpc.Server {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		log.Error("invalid gRPC server configuration", "err", err)
	}
	c := &core{
		broker:          cfg.Broker,
		authn:           cfg.Authenticator,
		authz:           cfg.Authorizer,
		log:             log,
		endpoints:       cfg.Endpoints,
		sslmode:         cfg.SSLMode,
		maxStreamLeases: cfg.MaxStreamLeases,
		auditor:         cfg.Auditor,
		quota:           newQuotaKeeper(cfg.Quotas, cfg.LiveQuotas, cfg.Broker),
		rotator:         cfg.RootRotator,
		reloader:        cfg.ConfigReloader,
		backup:          cfg.StoreBackup,
		status:          cfg.Status,
		keepAliveSlots:  make(chan struct{}, maxKeepAliveInflight),
	}
	if c.authn == nil {
		c.authn = LocalAuthenticator{}
	}
	if c.authz == nil {
		c.authz = OwnerAuthorizer{}
	}
	if !sslModes[c.sslmode] {
		c.sslmode = DefaultSSLMode
	}
	if c.maxStreamLeases <= 0 {
		c.maxStreamLeases = DefaultMaxStreamLeases
	}
	c.maxKeepAliveLeases = int64(cfg.MaxKeepAliveLeases)
	if c.maxKeepAliveLeases <= 0 {
		c.maxKeepAliveLeases = int64(max(DefaultMaxKeepAliveLeases, c.maxStreamLeases))
	}
	maxRenewals := cfg.MaxPendingRenewals
	if maxRenewals <= 0 {
		maxRenewals = DefaultMaxPendingRenewals
	}
	c.renewSlots = make(chan struct{}, maxRenewals)
	drainer := cfg.Drainer
	if drainer == nil {
		drainer = NewDrainer()
	}
	c.draining = drainer.Draining()

	maxRecv, maxHeader := cfg.MaxRecvMsgSize, cfg.MaxHeaderListSize
	if maxRecv <= 0 {
		maxRecv = DefaultMaxRecvMsgSize
	}
	if maxHeader <= 0 {
		maxHeader = DefaultMaxHeaderListSize
	}
	// Audit sits inside logging (it reads the attributes the inner layers
	// add to the call's log line) and outside authentication (refused
	// callers are recorded too).
	unary := []grpc.UnaryServerInterceptor{c.unaryLog, c.unaryAudit, c.unaryRecover, c.unaryAuth}
	stream := []grpc.StreamServerInterceptor{c.streamLog, c.streamAudit, c.streamRecover, c.streamAuth}
	if cfg.ObserveUnary != nil {
		unary = append([]grpc.UnaryServerInterceptor{cfg.ObserveUnary}, unary...)
	}
	if cfg.ObserveStream != nil {
		stream = append([]grpc.StreamServerInterceptor{cfg.ObserveStream}, stream...)
	}
	all := append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxRecv),
		grpc.MaxHeaderListSize(uint32(maxHeader)),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	}, opts...)
	if c.auditor != nil {
		// Records the calls grpc-go refuses before the interceptors.
		all = append(all, grpc.StatsHandler(auditStats{c}))
	}
	gs := grpc.NewServer(all...)

	if cfg.Invoker != nil && c.broker != nil {
		cfg.Invoker.attach(c, unary)
	}
	status := healthpb.HealthCheckResponse_SERVING
	if c.broker != nil {
		pb.RegisterCredentialServiceServer(gs, &credentialServer{core: c})
		pb.RegisterAdminServiceServer(gs, &adminServer{core: c})
	} else {
		status = healthpb.HealthCheckResponse_NOT_SERVING
	}
	for _, name := range serviceNames {
		drainer.health.SetServingStatus(name, status)
	}
	// "" is the whole server: it is up even without a broker, so that a
	// probe can tell "misconfigured" from "not listening".
	drainer.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	if checked, ok := cfg.Auditor.(CheckedAuditor); ok && cfg.AuditRequired {
		c.requiredAuditor = checked
		// Set after the statuses above, so a log that fails already is
		// reported NOT_SERVING. After Drain these calls change nothing.
		checked.Watch(func(err error) {
			st := healthpb.HealthCheckResponse_SERVING
			if err != nil {
				st = healthpb.HealthCheckResponse_NOT_SERVING
				log.Error("audit log cannot be written; refusing calls (audit.required)", "err", err)
			} else {
				log.Info("audit log writable again; serving calls")
			}
			for _, name := range append([]string{""}, serviceNames...) {
				if name != "" && c.broker == nil {
					continue
				}
				drainer.health.SetServingStatus(name, st)
			}
		})
		if err := checked.Healthy(); err != nil {
			for _, name := range append([]string{""}, serviceNames...) {
				drainer.health.SetServingStatus(name, healthpb.HealthCheckResponse_NOT_SERVING)
			}
		}
	}
	healthpb.RegisterHealthServer(gs, drainer.health)
	reflection.Register(gs)
	return gs
}

// core is what both services share.
type core struct {
	broker          *broker.Broker
	authn           Authenticator
	authz           Authorizer
	log             *slog.Logger
	endpoints       map[string]broker.Endpoint
	sslmode         string
	maxStreamLeases int
	draining        <-chan struct{}
	auditor         RequestAuditor
	// requiredAuditor is set with Config.AuditRequired: calls it cannot
	// record are refused.
	requiredAuditor CheckedAuditor
	quota           *quotaKeeper
	rotator         RootRotator
	reloader        ConfigReloader
	backup          StoreBackup
	status          StatusSource
	// keepAliveSlots bounds the KeepAlive requests being handled across
	// all streams (see keepalive.go).
	keepAliveSlots chan struct{}
	// keepAliveLeases counts the leases named on all KeepAlive streams,
	// at most maxKeepAliveLeases.
	keepAliveLeases    atomic.Int64
	maxKeepAliveLeases int64
	// renewSlots holds one token per RenewLease call in progress.
	renewSlots chan struct{}
}

// takeKeepAliveLease counts one more lease named on a KeepAlive stream, or
// reports that the broker keeps as many as it may. Every true is matched by
// one dropKeepAliveLease.
func (c *core) takeKeepAliveLease() bool {
	if c.keepAliveLeases.Add(1) > c.maxKeepAliveLeases {
		c.keepAliveLeases.Add(-1)
		return false
	}
	return true
}

func (c *core) dropKeepAliveLease() { c.keepAliveLeases.Add(-1) }

// takeRenewSlot admits one RenewLease call, or refuses it when
// cap(renewSlots) are in progress already. On success call the returned
// function when the call ends.
func (c *core) takeRenewSlot() (func(), error) {
	select {
	case c.renewSlots <- struct{}{}:
		return func() { <-c.renewSlots }, nil
	default:
		return nil, fmt.Errorf("the broker is already renewing %d leases for RenewLease calls; retry with backoff, or keep leases alive on a KeepAlive stream: %w",
			cap(c.renewSlots), broker.ErrResourceExhausted)
	}
}
