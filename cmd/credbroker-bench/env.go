package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/postgres/pgcluster"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/store"
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
	broker    *broker.Broker
	store     *store.Store
	engine    *postgres.Engine
	grpcSrv   *grpc.Server
	storePath string

	cluster *pgcluster.Cluster
	tmp     string
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
	return config.DefaultMaxConns
}

// startBroker runs the broker in this process, over a real bbolt file
// (fsync kept) and served by the real gRPC server on a loopback listener.
func (e *env) startBroker(ctx context.Context) error {
	var err error
	e.storePath = filepath.Join(e.tmp, "leases.db")
	if e.store, err = store.Open(e.storePath, store.Options{Logger: e.log}); err != nil {
		return err
	}
	e.engine, err = postgres.New(ctx, postgres.Config{
		URL: e.adminURL, Password: e.adminPassword, MarkerRole: e.markerRole,
		MaxConns: e.maxConns(), Logger: e.log,
	})
	if err != nil {
		return err
	}
	e.broker, err = broker.New(broker.Config{
		Store:     e.store,
		Databases: map[string]broker.Database{"main": e.engine},
		Roles: []broker.Role{{
			Name: e.role, Target: "main", ProxyRole: e.proxyRole,
			DefaultTTL: time.Hour, MaxTTL: 24 * time.Hour,
		}},
		Logger:            e.log,
		RevokeConcurrency: e.revokeConcurrency(),
		RevokeRate:        e.revokeRate(),
	})
	if err != nil {
		return err
	}
	if err := e.broker.Start(ctx); err != nil {
		return err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	e.grpcSrv = server.NewGRPCServer(server.Config{
		Broker:        e.broker,
		Authenticator: server.LocalAuthenticator{},
		Endpoints:     map[string]broker.Endpoint{"main": e.engine.Endpoint()},
		// The bench's streams name more leases than a sidecar would.
		MaxStreamLeases: 1 << 20,
	})
	go func() { _ = e.grpcSrv.Serve(lis) }()
	e.conn, err = grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	return err
}

// revokeConcurrency is the broker's expiry worker count (brokerd's default
// unless --revoke-concurrency), which the expiry baseline matches.
func (e *env) revokeConcurrency() int {
	if e.opts.brokerRevokeConc > 0 {
		return e.opts.brokerRevokeConc
	}
	return config.DefaultRevokeConcurrency
}

func (e *env) revokeRate() float64 {
	if e.opts.brokerRevokeRate > 0 {
		return e.opts.brokerRevokeRate
	}
	return config.DefaultRevokeRate
}

func (e *env) close() {
	if e.conn != nil {
		_ = e.conn.Close()
	}
	if e.grpcSrv != nil {
		e.grpcSrv.Stop()
	}
	if e.broker != nil {
		_ = e.broker.Close()
	}
	if e.engine != nil {
		e.engine.Close()
	}
	if e.store != nil {
		_ = e.store.Close()
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
