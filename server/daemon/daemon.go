package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/privcheck"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/rootcred"
	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/etcd"
)

// privcheckTimeout bounds the least-privilege check brokerd runs beside
// serving at start-up.
const privcheckTimeout = 30 * time.Second

// Options are what a caller of Start may set beyond the configuration:
// none of them is an operator's setting. The zero value is brokerd's.
type Options struct {
	// Logger receives brokerd's log; nil discards it.
	Logger *slog.Logger
	// Listener, if set, is served instead of binding cfg.Listen (the
	// caller bound it first, or rebinds an address across a restart).
	// Start takes it over: Close closes it.
	Listener net.Listener
	// Clock is the broker's clock; nil is the system clock. For tests:
	// a test's hand-driven clock is used as it is, without brokerd's
	// database-anchored lease clock (dbclock.go) or the expiry manager's
	// check of the database's clock.
	Clock broker.Clock
	// HostClock stands for the host's wall clock under brokerd's lease
	// clock, which reads it only before the first reading of a target's
	// clock (dbclock.go); nil is the system clock. For tests that step one
	// instance's clock.
	HostClock broker.Clock
	// StoreNoSync skips fsync on the store's commits: a crash may lose
	// acknowledged writes. For tests and benchmarks only.
	StoreNoSync bool
	// MaxStreamLeases overrides how many leases one KeepAlive stream may
	// name (server.DefaultMaxStreamLeases): the bench's streams name more
	// than a sidecar's would.
	MaxStreamLeases int
	// SkipPrivilegeCheck skips the least-privilege check brokerd logs at
	// start-up (tests that count queries or log lines).
	SkipPrivilegeCheck bool
	// ConfigPath is the file cfg was read from, which Reload re-reads
	// (SIGHUP, brokerctl reload); "" refuses reloads.
	ConfigPath string
	// LogLevel, when set, is the level Logger filters at: a reload sets it
	// to log.level (config.Log.NewLevelLogger builds such a logger).
	LogLevel *slog.LevelVar
}

// Daemon is a started broker. Serve serves it; Close releases it.
type Daemon struct {
	// cfg is the configuration Start was given; current is the one in
	// force, which a reload replaces (reload.go).
	cfg     *config.Config
	current atomic.Pointer[config.Config]
	reload  reloadState
	log     *slog.Logger
	lis     net.Listener

	store broker.LeaseStore
	// leader is the brokerd's leadership in its group on etcd; nil on
	// bbolt, where the one brokerd always leads.
	leader    *groupLeader
	databases map[string]broker.Database
	endpoints map[string]broker.Endpoint
	rootCreds *rootcred.Credentials
	audit     *audit.Log
	broker    *broker.Broker
	security  *security
	grpc      *grpc.Server
	drainer   *server.Drainer
	metrics   *metricsServer  // nil without metrics.listen
	vaultAPI  *vaultAPIServer // nil without vault_api.listen

	ready chan struct{}
	// started is when Start began: the instance's start time.
	started time.Time
	// background is the work Start began beside serving (the root
	// credentials' watch, the least-privilege check); stopBackground
	// ends it and Close waits for it.
	background     sync.WaitGroup
	stopBackground context.CancelFunc

	closeOnce sync.Once
	closeErr  error
}

// Start turns a validated configuration into a started broker: it binds
// the gRPC address (before anything slower, so a taken port fails fast),
// reads the secrets the configuration names, opens the lease store,
// connects to every target and checks every role's proxy role there (a
// target that cannot be reached is connected in the background instead,
// see target.go; any other failure to connect fails the start),
// opens the audit log, starts the broker's background work (expiry,
// reconciliation) and builds the gRPC server. Errors name the key they
// are about ("targets[0]", "roles[1].proxy_role"); on error everything
// opened so far is closed again. The returned Daemon accepts calls once
// Serve runs.
func Start(ctx context.Context, cfg *config.Config, opts Options) (_ *Daemon, err error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Daemon{
		cfg:       cfg,
		log:       log,
		lis:       opts.Listener,
		databases: make(map[string]broker.Database, len(cfg.Targets)),
		endpoints: make(map[string]broker.Endpoint, len(cfg.Targets)),
		ready:     make(chan struct{}),
		reload:    reloadState{path: opts.ConfigPath, level: opts.LogLevel},
		started:   time.Now().UTC().Round(0),
	}
	d.current.Store(cfg)
	defer func() {
		if err != nil {
			_ = d.Close()
		}
	}()
	logConfig(log, cfg)
	if d.lis == nil {
		if d.lis, err = Listen(cfg.Listen, cfg.Security.TLS != nil); err != nil {
			return nil, err
		}
	}
	if d.metrics, err = newMetricsServer(cfg); err != nil {
		return nil, err
	}
	if d.vaultAPI, err = newVaultAPIServer(cfg); err != nil {
		return nil, err
	}
	warnings, err := rootcred.Check(cfg)
	for _, w := range warnings {
		log.Warn("config: " + w)
	}
	if err != nil {
		return nil, err
	}

	if d.store, err = openStore(ctx, cfg.Store, log, opts.StoreNoSync, d.metrics.commitObserver()); err != nil {
		return nil, err
	}
	if es, ok := d.store.(*etcd.Store); ok {
		if d.leader, err = newGroupLeader(ctx, cfg, es, d.lis.Addr().String(), d.started, log); err != nil {
			return nil, err
		}
		if d.metrics != nil {
			d.leader.metrics = d.metrics
			d.metrics.leader = d.leader.ready
		}
	}
	d.rootCreds = rootcred.New(log)
	late, err := d.connectAll(ctx)
	if err != nil {
		return nil, err
	}
	for name, db := range d.databases {
		d.endpoints[name] = db.Endpoint()
	}

	var auditor broker.Auditor
	if cfg.Security.Audit.Path != "" {
		key, err := rootcred.AuditKey(cfg.Security.Audit)
		if err != nil {
			return nil, err
		}
		// Opened before the broker exists, so that what start-up
		// reconciliation drops is on the record too.
		d.audit, err = audit.Open(cfg.Security.Audit.Path, audit.Options{HMACKey: key, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("audit.path: %w", err)
		}
		auditor = d.audit
	}

	clock := opts.Clock
	var anchored *anchoredClock
	if clock == nil {
		// Lease times on the targets' clock, advanced by the monotonic
		// clock between readings (dbclock.go).
		anchored = newAnchoredClock(opts.HostClock, log)
		anchored.read(ctx, databaseClocks(d.databases))
		clock = anchored
	}
	bcfg := BrokerConfig(cfg)
	bcfg.Store, bcfg.Databases, bcfg.Logger, bcfg.Clock, bcfg.Auditor = d.store, d.databases, log, clock, auditor
	bcfg.Instance = cfg.Instance
	// On the system clock, expiries are checked against the targets'
	// clocks (a step of this host's clock revokes nothing early); a test's
	// hand-driven clock is not followed by a real PostgreSQL.
	bcfg.CheckDatabaseClock = opts.Clock == nil
	if d.leader != nil {
		d.leader.audit = d.audit
		bcfg.Leadership = d.leader
		// An issue in flight on another instance is invisible here: the
		// reconciler drops only what two sweeps a session TTL apart agree
		// on.
		bcfg.ReconcileConfirm = cfg.Store.Etcd.SessionTTL
	}
	if d.broker, err = broker.New(bcfg); err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	// TLS files that do not load are found before the broker starts work.
	if d.security, err = newSecurity(cfg.Security, d.audit, log); err != nil {
		return nil, err
	}
	if err := d.watchMetrics(ctx); err != nil {
		return nil, err
	}
	if err := d.broker.Start(ctx); err != nil {
		return nil, err
	}

	d.drainer = server.NewDrainer()
	d.grpc = server.NewGRPCServer(server.Config{
		Broker:          d.broker,
		Authenticator:   d.security.authenticator,
		Authorizer:      d.security.authorizer,
		LiveQuotas:      d.security.quotas,
		ConfigReloader:  d,
		StoreBackup:     d,
		Auditor:         d.security.auditor,
		AuditRequired:   d.security.auditRequired,
		Logger:          log,
		Endpoints:       d.endpoints,
		SSLMode:         cfg.DSNSSLMode,
		Drainer:         d.drainer,
		RootRotator:     d.rootRotator(),
		Status:          d,
		MaxStreamLeases: opts.MaxStreamLeases,
		ObserveUnary:    d.metrics.unary(),
		ObserveStream:   d.metrics.stream(),
		Invoker:         d.vaultAPI.serverInvoker(),
	}, d.security.serverOptions...)
	d.serveMetrics()

	bg, stop := context.WithCancel(context.WithoutCancel(ctx))
	d.stopBackground = stop
	for i, t := range cfg.Targets {
		lt, ok := late[i]
		if !ok {
			d.drainer.HealthServer().SetServingStatus(TargetHealthService(t.Name), healthpb.HealthCheckResponse_SERVING)
			continue
		}
		// Before the loop starts, which sets SERVING once connected.
		d.drainer.HealthServer().SetServingStatus(TargetHealthService(t.Name), healthpb.HealthCheckResponse_NOT_SERVING)
		d.background.Go(func() { d.connectLate(bg, i, t, lt) })
	}
	if anchored != nil {
		d.background.Go(func() { anchored.follow(bg, databaseClocks(d.databases)) })
	}
	// Re-read the admin passwords' sources and keep Vault tokens alive.
	d.background.Go(func() { d.rootCreds.Watch(bg) })
	if !opts.SkipPrivilegeCheck {
		// The check pages through the lease history (stale roles): it runs
		// beside serving, not before it, or a store of a million records
		// would keep brokerd from serving for seconds.
		d.background.Go(func() {
			ctx, cancel := context.WithTimeout(bg, privcheckTimeout)
			defer cancel()
			findings, err := privcheck.Run(ctx,
				privcheck.Scope{Targets: cfg.TargetNames(), Roles: cfg.Roles, Engines: d.databases},
				privcheck.Options{Leases: d.store, Retention: cfg.Store.TombstoneRetention})
			privcheck.LogFindings(ctx, log, findings, err)
		})
	}
	return d, nil
}

// openStore opens the lease store the configuration names: the bbolt file
// of store.path, or the etcd cluster of store.etcd (whose password file it
// reads here, so the password is in no Config and no log).
func openStore(ctx context.Context, cfg config.Store, log *slog.Logger, noSync bool, observe func(time.Duration)) (broker.LeaseStore, error) {
	if e := cfg.Etcd; e != nil {
		opts := etcd.Options{
			Endpoints:   e.Endpoints,
			Prefix:      e.Prefix,
			DialTimeout: e.DialTimeout,
			// Stream marks (revoke_on_disconnect across instances) live on a
			// session of the same TTL as leadership: a dead instance's marks
			// vanish when it would have lost leadership.
			SessionTTL: e.SessionTTL,
			TLS:        etcd.TLSFiles{CAFile: e.TLS.CAFile, CertFile: e.TLS.CertFile, KeyFile: e.TLS.KeyFile},
			Username:   e.Username,
			Logger:     log,
		}
		if e.PasswordFile != "" {
			pw, _, err := rootcred.ReadSecretFile(e.PasswordFile)
			if err != nil {
				return nil, fmt.Errorf("store.etcd.password_file: %w", err)
			}
			opts.Password = pw.Reveal()
		}
		s, err := etcd.Open(ctx, opts)
		if err != nil {
			return nil, fmt.Errorf("store.etcd: %w", err)
		}
		return s, nil
	}
	s, err := store.Open(cfg.Path, store.Options{Timeout: cfg.OpenTimeout, Logger: log, NoSync: noSync, CommitObserver: observe})
	if err != nil {
		return nil, fmt.Errorf("store.path: %w", err)
	}
	return s, nil
}

// BrokerConfig is the broker's configuration as cfg sets it: roles and
// every expiry and reconciliation setting. Start fills in the parts it
// opens (store, engines, clock, logger, auditor).
func BrokerConfig(cfg *config.Config) broker.Config {
	return broker.Config{
		Roles:               cfg.Roles,
		ValidUntilGrace:     cfg.Expiry.ValidUntilGrace,
		TombstoneRetention:  cfg.Store.TombstoneRetention,
		ReconcileInterval:   cfg.ReconcileInterval,
		RevokeConcurrency:   cfg.Expiry.RevokeConcurrency,
		RevokeRate:          cfg.Expiry.RevokeRate,
		RevokeRetries:       cfg.Expiry.RevokeRetries,
		RetryBaseDelay:      cfg.Expiry.RetryBaseDelay,
		RetryMaxDelay:       cfg.Expiry.RetryMaxDelay,
		FailedRetryInterval: cfg.Expiry.FailedRetryInterval,
		DisconnectGrace:     cfg.DisconnectGrace,
		ActivityInterval:    activityInterval(cfg.Activity),
	}
}

// rootRotator is the root credentials' rotation, refused on an instance
// that does not lead its group.
func (d *Daemon) rootRotator() server.RootRotator {
	if d.leader == nil {
		return d.rootCreds
	}
	return leaderOnlyRotator{RootRotator: d.rootCreds, leader: d.leader}
}

// activityInterval is activity.sample_interval for broker.Config, whose
// zero means the default: off is negative there.
func activityInterval(a config.Activity) time.Duration {
	if a.SampleInterval == 0 {
		return -1
	}
	return a.SampleInterval
}

// Addr is the address served (the real port when cfg.Listen had :0).
func (d *Daemon) Addr() net.Addr { return d.lis.Addr() }

// Broker is the running broker.
func (d *Daemon) Broker() *broker.Broker { return d.broker }

// Store is the lease store.
func (d *Daemon) Store() broker.LeaseStore { return d.store }

// RootCredentials rotates and re-reads the targets' admin passwords.
func (d *Daemon) RootCredentials() *rootcred.Credentials { return d.rootCreds }

// Ready is closed once Serve accepts calls.
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// Serve serves gRPC until ctx is done or the server fails, then stops in
// order: health NOT_SERVING and KeepAlive streams ended (drain), unary
// calls in flight allowed to finish for up to shutdown_timeout, then cut.
// Call it once; Close releases everything afterwards.
func (d *Daemon) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- d.grpc.Serve(d.lis) }()
	if err := d.serveVaultAPI(); err != nil {
		d.grpc.Stop()
		<-errc
		return err
	}
	if d.audit != nil {
		d.audit.Record(audit.Record{Event: audit.EventStart, Outcome: audit.OutcomeOK,
			Message: fmt.Sprintf("serving on %s (tls: %t, authentication: %t)", d.lis.Addr(), d.security.certs != nil, d.cfg.Security.Enabled())})
	}
	d.log.Info("serving", "listen", d.lis.Addr().String())
	close(d.ready)

	var serveErr error
	select {
	case <-ctx.Done():
		d.log.Info("shutting down")
	case serveErr = <-errc:
		d.log.Error("gRPC server stopped", "err", serveErr)
	}
	d.stopServing()
	if serveErr != nil {
		return fmt.Errorf("serve: %w", serveErr)
	}
	return nil
}

// stopServing drains the gRPC server and stops it within shutdown_timeout.
func (d *Daemon) stopServing() {
	d.drainer.Drain()
	// The Vault API's requests are gRPC calls: stopped first, within the
	// same timeout, so none reaches a stopped gRPC server.
	d.vaultAPI.shutdown(d.cfg.ShutdownTimeout)
	stopped := make(chan struct{})
	go func() {
		d.grpc.GracefulStop()
		close(stopped)
	}()
	timeout := d.current.Load().ShutdownTimeout
	select {
	case <-stopped:
	case <-time.After(timeout):
		d.log.Warn("calls still running after the shutdown timeout; cutting them", "shutdown_timeout", timeout)
		d.grpc.Stop()
		<-stopped
	}
}

// Close stops serving (if Serve still runs, its calls are cut), ends the
// background work, stops the broker's loops, then closes the engines, the
// store and the audit log, in that order, so no loop touches a closed
// engine. It is safe to call more than once.
func (d *Daemon) Close() error {
	d.closeOnce.Do(func() { d.closeErr = d.close() })
	return d.closeErr
}

func (d *Daemon) close() error {
	var errs []error
	d.metrics.close()
	d.vaultAPI.shutdown(0)
	if d.grpc != nil {
		d.drainer.Drain()
		d.grpc.Stop()
	}
	if d.lis != nil {
		_ = d.lis.Close() // already closed when Serve ran
	}
	if d.stopBackground != nil {
		d.stopBackground()
	}
	d.background.Wait()
	if d.leader != nil {
		d.leader.handOver() // the term Close resigns is handed over, not lost
	}
	if d.broker != nil {
		if err := d.broker.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close broker: %w", err))
		}
	}
	if d.leader != nil {
		// After the broker resigned its term: the session's lease is
		// revoked, so this instance leaves its group at once.
		if err := d.leader.Close(); err != nil {
			d.log.Warn("could not end the etcd session; it expires by itself", "err", err)
		}
	}
	for _, db := range d.databases {
		db.Close()
	}
	if d.store != nil {
		if err := d.store.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close store: %w", err))
		}
	}
	if d.audit != nil {
		if err := d.audit.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close audit log: %w", err))
		}
	}
	return errors.Join(errs...)
}
