package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/postgres/pgcluster"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
)

// env is what the scenarios run against: a PostgreSQL target reached two
// ways (through the broker over gRPC, and straight through pgx for the
// baseline) and, when the bench started them, the cluster and the broker.
type env struct {
	opts *options
	log  *slog.Logger

	// adminURL has no password; adminPassword goes beside it, as in a
	// brokerd configuration.
	adminURL      string
	adminPassword string
	admin         string // the admin role's name
	proxyRole     string
	markerRole    string
	// baseMarker stands in for the marker role in the baseline's SQL: the
	// same statement, but users the broker's reconciler does not see as
	// its own (it would drop them as orphans mid-measurement).
	baseMarker string
	role       string // the broker role the bench asks for
	pgVersion  string

	// base is the baseline's pool: the same admin role, sized to the
	// largest concurrency a scenario uses.
	base *pgxpool.Pool
	// watch is a separate small pool for observing (is a user gone?), so
	// observation never queues behind the workload.
	watch *pgxpool.Pool

	conn   *grpc.ClientConn
	cred   pb.CredentialServiceClient
	adminC pb.AdminServiceClient

	// In-process broker, when the bench started one.
	daemon      *daemon.Daemon
	broker      *broker.Broker
	stopServing context.CancelFunc
	served      chan error
	storePath   string

	cluster *pgcluster.Cluster
	tmp     string

	// Broker processes the bench started (see childBroker); issueBroker
	// is the one the issue scenario measures.
	children    []*childBroker
	issueBroker *childBroker
	// cpus is the --pin layout; pinned says whether it is in force.
	cpus   cpuSplit
	pinned bool
	// busy: the machine's load average exceeded its CPU count when the
	// run began (see loadAverage.busy).
	busy bool
}

const (
	benchAdmin = "bench_admin"
	benchProxy = "bench_ro"
	benchRole  = "bench"
)

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// setup starts (or connects to) PostgreSQL and the broker.
func setup(ctx context.Context, o *options, log *slog.Logger) (*env, error) {
	e := &env{opts: o, log: log, role: o.role, proxyRole: o.proxyRole, markerRole: o.markerRole}
	var err error
	e.tmp, err = os.MkdirTemp("", "credbroker-bench-")
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			e.close()
		}
	}()

	if o.pin != "off" {
		cpus, err := allowedCPUs()
		if err != nil {
			return nil, fmt.Errorf("--pin: %w", err)
		}
		if e.cpus, err = splitCPUs(cpus); err != nil {
			return nil, err
		}
	}
	if o.pgURL == "" {
		if err := e.startCluster(ctx); err != nil {
			return nil, err
		}
	} else {
		e.adminURL = o.pgURL
		e.adminPassword = os.Getenv("PGPASSWORD")
		if o.pgPasswordFile != "" {
			raw, err := os.ReadFile(o.pgPasswordFile)
			if err != nil {
				return nil, fmt.Errorf("--pg-password-file: %w", err)
			}
			e.adminPassword = strings.TrimRight(string(raw), "\r\n")
		}
	}

	poolSize := int32(max(o.maxLevel(), o.revokeConc, o.renewConc, 4))
	if e.base, err = e.pool(ctx, poolSize); err != nil {
		return nil, fmt.Errorf("baseline connection: %w", err)
	}
	if e.watch, err = e.pool(ctx, 2); err != nil {
		return nil, err
	}
	if err := e.base.QueryRow(ctx, "SELECT current_user, current_setting('server_version')").Scan(&e.admin, &e.pgVersion); err != nil {
		return nil, fmt.Errorf("baseline connection: %w", err)
	}
	if err := e.ensureBaseMarker(ctx); err != nil {
		return nil, err
	}

	if o.brokerAddr == "" {
		if err := e.startBroker(ctx); err != nil {
			return nil, err
		}
	} else {
		e.conn, err = grpc.NewClient(o.brokerAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, fmt.Errorf("--broker: %w", err)
		}
	}
	e.cred = pb.NewCredentialServiceClient(e.conn)
	e.adminC = pb.NewAdminServiceClient(e.conn)
	ok = true
	return e, nil
}

// ensureBaseMarker creates the baseline's stand-in marker role, as the
// engine creates its marker role: NOLOGIN, granted to the admin.
func (e *env) ensureBaseMarker(ctx context.Context) error {
	e.baseMarker = "credbroker_bench_baseline"
	var exists bool
	if err := e.base.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", e.baseMarker).Scan(&exists); err != nil {
		return err
	}
	if exists {
		return nil
	}
	if _, err := e.base.Exec(ctx, "CREATE ROLE "+e.baseMarker+" NOLOGIN"); err != nil {
		return fmt.Errorf("creating the baseline's marker role: %w", err)
	}
	// PostgreSQL 16+ gives the creator ADMIN OPTION by itself; before 16,
	// CREATEROLE may grant it, as the engine does for its marker role.
	_, _ = e.base.Exec(ctx, "GRANT "+e.baseMarker+" TO "+postgres.QuoteIdentifier(e.admin)+" WITH ADMIN OPTION")
	return nil
}

func (e *env) pool(ctx context.Context, size int32) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(e.adminURL)
	if err != nil {
		return nil, errors.New("cannot parse the PostgreSQL URL (not shown)")
	}
	pc.ConnConfig.Password = e.adminPassword
	pc.MaxConns = size
	pc.MinConns = size
	p, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, err
	}
	if err := p.Ping(ctx); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// startCluster starts a throwaway cluster with production durability
// (fsync and synchronous_commit on, unless --pg-durable=false): the broker
// keeps fsync on its store, so the baseline must pay PostgreSQL's.
func (e *env) startCluster(ctx context.Context) error {
	conf := map[string]string{"max_connections": "300"}
	if e.opts.pgDurable {
		conf["fsync"] = "on"
		conf["synchronous_commit"] = "on"
		conf["full_page_writes"] = "on"
	}
	for k, v := range e.opts.pgConf {
		conf[k] = v
	}
	c, err := pgcluster.Start(ctx, pgcluster.Options{ExtraConf: conf})
	if err != nil {
		return fmt.Errorf("start PostgreSQL: %w", err)
	}
	e.cluster = c
	e.adminPassword = randHex(16)
	e.proxyRole, e.markerRole, e.role = benchProxy, postgres.DefaultMarkerRole, benchRole
	stmts := []string{"CREATE ROLE " + benchProxy + " NOLOGIN"}
	setup, err := postgres.AdminSetupSQL(postgres.SetupParams{
		Admin: benchAdmin, AdminPassword: e.adminPassword, ProxyRoles: []string{benchProxy}, ServerVersion: c.Version,
	})
	if err != nil {
		return err
	}
	stmts = append(stmts, setup...)
	conn, err := pgx.Connect(ctx, c.SuperuserURL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	for _, s := range stmts {
		if _, err := conn.Exec(ctx, s); err != nil {
			return fmt.Errorf("admin setup: %w", err)
		}
	}
	e.adminURL = c.URL(benchAdmin, "", "postgres")
	return nil
}

// maxConns is the engine's pool size: --max-conns, else brokerd's default
// for targets[].max_conns.
func (e *env) maxConns() int32 {
	if e.opts.maxConns > 0 {
		return int32(e.opts.maxConns)
	}
	return postgres.DefaultMaxConns
}

// writeConfig writes a password file and a brokerd configuration for the
// bench's target into dir, serving listen with the store at storePath;
// extra is appended (YAML). It returns the configuration file's path.
func (e *env) writeConfig(dir, listen, storePath, extra string) (string, error) {
	pwFile := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pwFile, []byte(e.adminPassword+"\n"), 0o600); err != nil {
		return "", err
	}
	cfgFile := filepath.Join(dir, "brokerd.yaml")
	yaml := fmt.Sprintf(`listen: %s
store:
  path: %s
targets:
  - name: main
    url: %s
    password_file: %s
    marker_role: %s
    max_conns: %d
    scram_iterations: %d
roles:
  - name: %s
    target: main
    proxy_role: %s
    default_ttl: 1h
    max_ttl: 24h
`, listen, storePath, e.adminURL, pwFile, e.markerRole, e.maxConns(), e.opts.scramIterations, e.role, e.proxyRole)
	return cfgFile, os.WriteFile(cfgFile, []byte(yaml+extra), 0o600)
}

// startBroker runs the broker in this process as brokerd does (package
// daemon), over a real bbolt file (fsync kept), served by the real gRPC
// server on a loopback listener.
func (e *env) startBroker(ctx context.Context) error {
	e.storePath = filepath.Join(e.tmp, "leases.db")
	cfgFile, err := e.writeConfig(e.tmp, "127.0.0.1:0", e.storePath,
		fmt.Sprintf("expiry: {revoke_concurrency: %d, revoke_rate: %g}\n", e.revokeConcurrency(), e.revokeRate()))
	if err != nil {
		return err
	}
	f, err := config.Load(cfgFile)
	if err != nil {
		return err
	}
	cfg, err := f.Validate()
	if err != nil {
		return err
	}
	// The bench's streams name more leases than a sidecar would.
	e.daemon, err = daemon.Start(ctx, cfg, daemon.Options{Logger: e.log, MaxStreamLeases: 1 << 20, SkipPrivilegeCheck: true})
	if err != nil {
		return err
	}
	e.broker = e.daemon.Broker()
	serveCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	e.stopServing, e.served = stop, make(chan error, 1)
	go func() { e.served <- e.daemon.Serve(serveCtx) }()
	<-e.daemon.Ready()
	e.conn, err = grpc.NewClient(e.daemon.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	return err
}

// revokeConcurrency is the broker's expiry worker count (brokerd's default
// unless --revoke-concurrency), which the expiry baseline matches.
func (e *env) revokeConcurrency() int {
	if e.opts.brokerRevokeConc > 0 {
		return e.opts.brokerRevokeConc
	}
	return broker.DefaultRevokeConcurrency
}

func (e *env) revokeRate() float64 {
	if e.opts.brokerRevokeRate > 0 {
		return e.opts.brokerRevokeRate
	}
	return broker.DefaultRevokeRate
}

func (e *env) close() {
	for _, b := range e.children {
		b.stop()
	}
	if e.conn != nil {
		_ = e.conn.Close()
	}
	if e.daemon != nil {
		e.stopServing()
		<-e.served
		_ = e.daemon.Close()
	}
	if e.base != nil {
		e.base.Close()
	}
	if e.watch != nil {
		e.watch.Close()
	}
	if e.cluster != nil {
		if e.opts.keepLog {
			if raw, err := e.cluster.Log(); err == nil {
				_ = os.WriteFile("credbroker-bench-pg.log", raw, 0o600)
			}
		}
		_ = e.cluster.Stop()
	}
	if e.tmp != "" {
		_ = os.RemoveAll(e.tmp)
	}
}
