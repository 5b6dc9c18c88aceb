// Package pgtest gives every package's tests a real PostgreSQL server and,
// per test, an isolated target on it: a fresh database with a demo table,
// proxy roles, a marker role and a non-superuser admin role with exactly
// the grants of postgres.AdminSetupSQL. Names are random, so tests in one
// package run in parallel without seeing each other's users.
//
// A package opts in from its TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
//
// The first Server call starts one throwaway cluster (package pgcluster)
// for the package binary, or uses the server named by
// $CREDBROKER_TEST_PG_URL (a superuser URL) when set; Main stops it when
// the tests are done. A package's tests that never call Server run without
// PostgreSQL.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/postgres/pgcluster"
)

// ExternalURLEnv names a superuser URL of an existing server to test
// against instead of starting a cluster.
const ExternalURLEnv = "CREDBROKER_TEST_PG_URL"

// DemoTable is the table NewTarget creates in every target database.
const DemoTable = "demo"

// The package's server is started by the first Server call, not by Main,
// so that tests which need no PostgreSQL (unit tests, fuzz workers) run
// without one.
var (
	// mainCalled is set by Main; Server refuses to start a server that no
	// Main will stop.
	mainCalled bool
	startOnce  sync.Once
	// startCtx bounds the start; Main's signal handler cancels it.
	startCtx    context.Context
	startCancel context.CancelFunc

	mu       sync.Mutex
	current  *Instance
	startErr error
	stopped  bool // Main has stopped, or is stopping, the server
)

// Instance is the PostgreSQL server of a test binary.
type Instance struct {
	// Cluster is the throwaway cluster; nil for an external server.
	Cluster *pgcluster.Cluster
	// SuperURL is a superuser URL for a database.
	SuperURL func(database string) string
	Host     string
	Port     int
	// Version is the major version (15).
	Version int
}

// MajorEnv, when set, is the major version the server must have: `make
// test` runs the PostgreSQL-facing packages once per version and sets it,
// so a run meant for PostgreSQL 17 cannot silently test another server.
const MajorEnv = "CREDBROKER_TEST_PG_MAJOR"

// Main runs the tests and stops the package's PostgreSQL server at the end
// if a test started one (see Server), also when the test binary gets SIGINT
// or SIGTERM. Call it as os.Exit(pgtest.Main(m)). It returns the exit code.
func Main(m *testing.M) int {
	mu.Lock()
	mainCalled = true
	mu.Unlock()
	// Two minutes for the start from the first Server call on; counted
	// from there, not from now, by startServer.
	startCtx, startCancel = context.WithCancel(context.Background())
	stop := sync.OnceValue(func() error {
		startCancel() // a start under way gives up
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		if current == nil || current.Cluster == nil {
			return nil
		}
		return current.Cluster.Stop()
	})

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s, ok := <-sigs
		if !ok {
			return
		}
		fmt.Fprintf(os.Stderr, "pgtest: %v: stopping PostgreSQL\n", s)
		_ = stop()
		code := 1
		if sig, ok := s.(syscall.Signal); ok {
			code = 128 + int(sig)
		}
		os.Exit(code)
	}()

	code := m.Run()
	signal.Stop(sigs)
	close(sigs) // no more sends after Stop; ends the goroutine
	if err := stop(); err != nil {
		fmt.Fprintln(os.Stderr, "pgtest: stopping PostgreSQL:", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// startServer starts the package's server, once, and checks its version
// against $CREDBROKER_TEST_PG_MAJOR.
func startServer() (*Instance, error) {
	ctx, cancel := context.WithTimeout(startCtx, 2*time.Minute)
	defer cancel()
	srv, err := start(ctx)
	if err != nil {
		return nil, err
	}
	if want := os.Getenv(MajorEnv); want != "" && want != strconv.Itoa(srv.Version) {
		if srv.Cluster != nil {
			_ = srv.Cluster.Stop()
		}
		return nil, fmt.Errorf("$%s is %s, but the server is PostgreSQL %d", MajorEnv, want, srv.Version)
	}
	mu.Lock()
	defer mu.Unlock()
	if stopped {
		// Main stopped (a signal) while the server started.
		if srv.Cluster != nil {
			_ = srv.Cluster.Stop()
		}
		return nil, errors.New("the test binary is stopping")
	}
	current = srv
	fmt.Fprintf(os.Stderr, "pgtest: PostgreSQL %d\n", srv.Version)
	return srv, nil
}

func start(ctx context.Context) (*Instance, error) {
	if raw := os.Getenv(ExternalURLEnv); raw != "" {
		return external(ctx, raw)
	}
	// Statements are logged so tests can prove no password reaches the
	// server log (see Instance.Log).
	c, err := pgcluster.Start(ctx, pgcluster.Options{LogStatements: true})
	if err != nil {
		return nil, err
	}
	return &Instance{Cluster: c, SuperURL: c.SuperuserURL, Host: c.Host, Port: c.Port, Version: c.Version}, nil
}

// external checks that $CREDBROKER_TEST_PG_URL names a superuser. Errors
// do not repeat the URL: it may hold a password.
func external(ctx context.Context, raw string) (*Instance, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return nil, fmt.Errorf("$%s must be a postgres:// URL", ExternalURLEnv)
	}
	cfg, err := pgconn.ParseConfig(raw)
	if err != nil {
		return nil, fmt.Errorf("$%s cannot be parsed", ExternalURLEnv)
	}
	conn, err := pgx.Connect(ctx, raw)
	if err != nil {
		return nil, fmt.Errorf("$%s: connecting: %w", ExternalURLEnv, err)
	}
	defer conn.Close(ctx)
	var super bool
	var version int
	err = conn.QueryRow(ctx, `SELECT rolsuper, current_setting('server_version_num')::int / 10000
		FROM pg_roles WHERE rolname = current_user`).Scan(&super, &version)
	if err != nil {
		return nil, fmt.Errorf("$%s: %w", ExternalURLEnv, err)
	}
	if !super {
		return nil, fmt.Errorf("$%s must name a superuser", ExternalURLEnv)
	}
	return &Instance{
		SuperURL: func(db string) string {
			v := *u
			v.Path = "/" + db
			return v.String()
		},
		Host:    cfg.Host,
		Port:    int(cfg.Port),
		Version: version,
	}, nil
}

// Server returns the package's server, starting it on the first call. It
// fails the test, never skips it, when TestMain did not call Main or the
// server cannot be started; every later call fails with the same error.
func Server(t testing.TB) *Instance {
	t.Helper()
	mu.Lock()
	called := mainCalled
	mu.Unlock()
	if !called {
		t.Fatal("pgtest: no PostgreSQL server: the package's TestMain must call os.Exit(pgtest.Main(m))")
	}
	startOnce.Do(func() {
		srv, err := startServer()
		mu.Lock()
		current, startErr = srv, err
		mu.Unlock()
	})
	mu.Lock()
	srv, err := current, startErr
	mu.Unlock()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return srv
}

// HasLog reports whether Log returns the server's log with every statement
// in it (true for the cluster pgtest starts; false for an external server).
func (s *Instance) HasLog() bool { return s.Cluster != nil }

// Log returns the server log so far; nil when HasLog is false.
func (s *Instance) Log() []byte {
	if s.Cluster == nil {
		return nil
	}
	b, err := s.Cluster.Log()
	if err != nil {
		return nil
	}
	return b
}

// ProxyRole describes one proxy role of a target.
type ProxyRole struct {
	// Name is the logical name, the key of Target.ProxyRoles.
	Name string
	// Privileges are granted on the demo table: "SELECT", "INSERT", ...
	Privileges []string
	// CreateOnSchema grants CREATE on schema public of the target database
	// (PostgreSQL 15+ no longer grants it to PUBLIC).
	CreateOnSchema bool
	// Login creates the role LOGIN: a misconfiguration, for tests of
	// Engine.CheckProxyRole.
	Login bool
	// NotGranted leaves the role out of the admin's grants: a
	// misconfiguration, for tests of Engine.CheckProxyRole.
	NotGranted bool
}

// DefaultProxyRoles are the proxy roles of a target when TargetOptions
// names none: "read_only" may SELECT the demo table, "updater" may also
// INSERT and UPDATE it.
func DefaultProxyRoles() []ProxyRole {
	return []ProxyRole{
		{Name: "read_only", Privileges: []string{"SELECT"}},
		{Name: "updater", Privileges: []string{"SELECT", "INSERT", "UPDATE"}},
	}
}

// TargetOptions shape a target.
type TargetOptions struct {
	// ProxyRoles to create; nil is DefaultProxyRoles().
	ProxyRoles []ProxyRole
}

// Target is one isolated target on the package's server.
type Target struct {
	// AdminURL is the admin's URL on the target database, without the
	// password (as the broker's configuration has it).
	AdminURL      string
	AdminUser     string
	AdminPassword string
	Database      string
	MarkerRole    string
	// ProxyRoles maps each logical name to the actual role name.
	ProxyRoles map[string]string
	// SuperURL is a superuser URL on the target database.
	SuperURL string

	server *Instance
}

// URL is a login URL for any role on the target database, over TCP so the
// server checks the password.
func (tg *Target) URL(user, password string) string {
	if tg.server.Cluster != nil {
		return tg.server.Cluster.URL(user, password, tg.Database)
	}
	u, _ := url.Parse(tg.server.SuperURL(tg.Database))
	u.User = url.User(user)
	if password != "" {
		u.User = url.UserPassword(user, password)
	}
	return u.String()
}

// EngineConfig is the postgres.Config the broker would use for this target.
func (tg *Target) EngineConfig() postgres.Config {
	return postgres.Config{URL: tg.AdminURL, Password: tg.AdminPassword, MarkerRole: tg.MarkerRole}
}

// NewTarget creates a target and registers a cleanup that drops everything
// it made, including any user the broker issued on it (every member of its
// marker role).
func (s *Instance) NewTarget(t testing.TB, opts TargetOptions) *Target {
	t.Helper()
	roles := opts.ProxyRoles
	if roles == nil {
		roles = DefaultProxyRoles()
	}
	id := "cbt_" + randomHex(5)
	tg := &Target{
		AdminUser:     id + "_admin",
		AdminPassword: randomHex(16),
		Database:      id,
		MarkerRole:    id + "_managed",
		ProxyRoles:    map[string]string{},
		SuperURL:      s.SuperURL(id),
		server:        s,
	}
	tg.AdminURL = tg.URL(tg.AdminUser, "")
	var granted []string
	for _, r := range roles {
		if err := postgres.ValidIdentifier(r.Name); err != nil {
			t.Fatalf("pgtest: proxy role name: %v", err)
		}
		if _, dup := tg.ProxyRoles[r.Name]; dup {
			t.Fatalf("pgtest: proxy role %q listed twice", r.Name)
		}
		tg.ProxyRoles[r.Name] = id + "_" + r.Name
		if !r.NotGranted {
			granted = append(granted, tg.ProxyRoles[r.Name])
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Registered first, so a half-made target is cleaned up too.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := tg.drop(ctx); err != nil {
			t.Errorf("pgtest: dropping target %s: %v", id, err)
		}
	})

	q := postgres.QuoteIdentifier
	stmts := []string{"CREATE DATABASE " + q(tg.Database)}
	for _, r := range roles {
		login := "NOLOGIN"
		if r.Login {
			login = "LOGIN"
		}
		stmts = append(stmts, "CREATE ROLE "+q(tg.ProxyRoles[r.Name])+" "+login)
	}
	setup, err := postgres.AdminSetupSQL(postgres.SetupParams{
		Admin:         tg.AdminUser,
		AdminPassword: tg.AdminPassword,
		ProxyRoles:    granted,
		MarkerRole:    tg.MarkerRole,
		ServerVersion: s.Version,
	})
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	stmts = append(stmts, setup...)
	if err := execAll(ctx, s.SuperURL("postgres"), stmts); err != nil {
		t.Fatalf("pgtest: creating target: %v", err)
	}

	stmts = []string{
		"CREATE TABLE " + DemoTable + " (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, note text NOT NULL DEFAULT '')",
		"INSERT INTO " + DemoTable + " (note) VALUES ('hello')",
	}
	for _, r := range roles {
		if len(r.Privileges) > 0 {
			stmts = append(stmts, "GRANT "+strings.Join(r.Privileges, ", ")+" ON "+DemoTable+" TO "+q(tg.ProxyRoles[r.Name]))
		}
		if r.CreateOnSchema {
			stmts = append(stmts, "GRANT CREATE ON SCHEMA public TO "+q(tg.ProxyRoles[r.Name]))
		}
	}
	if err := execAll(ctx, tg.SuperURL, stmts); err != nil {
		t.Fatalf("pgtest: creating demo table: %v", err)
	}
	return tg
}

func execAll(ctx context.Context, connURL string, stmts []string) error {
	conn, err := pgx.Connect(ctx, connURL)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	for _, s := range stmts {
		if _, err := conn.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", redactPassword(s), err)
		}
	}
	return nil
}

// redactPassword keeps even a verifier out of test output.
func redactPassword(stmt string) string {
	if i := strings.Index(stmt, " PASSWORD '"); i >= 0 {
		if j := strings.Index(stmt[i+11:], "'"); j >= 0 {
			return stmt[:i+11] + "[REDACTED]" + stmt[i+11+j:]
		}
	}
	return stmt
}

// drop removes the target: its sessions, database, issued users, proxy
// roles, marker and admin, in an order in which nothing depends on what is
// already gone.
func (tg *Target) drop(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, tg.server.SuperURL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `
		SELECT r.rolname FROM pg_auth_members m
		JOIN pg_roles r ON r.oid = m.member JOIN pg_roles g ON g.oid = m.roleid
		WHERE g.rolname = $1 AND r.rolname <> $2`, tg.MarkerRole, tg.AdminUser)
	if err != nil {
		return err
	}
	users, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	var proxies []string
	for _, r := range tg.ProxyRoles {
		proxies = append(proxies, r)
	}
	all := append(append(append([]string{}, users...), proxies...), tg.MarkerRole, tg.AdminUser)

	var errs []error
	if _, err := conn.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = $1 OR usename = ANY($2)`, tg.Database, all); err != nil {
		errs = append(errs, err)
	}
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+postgres.QuoteIdentifier(tg.Database)+" WITH (FORCE)"); err != nil {
		errs = append(errs, err)
	}
	for _, group := range [][]string{users, proxies, {tg.MarkerRole}, {tg.AdminUser}} {
		for _, r := range group {
			var exists bool
			if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", r).Scan(&exists); err != nil {
				errs = append(errs, err)
				continue
			}
			if !exists {
				continue
			}
			qr := postgres.QuoteIdentifier(r)
			// Objects or grants of the role in this database would block DROP ROLE.
			if _, err := conn.Exec(ctx, "DROP OWNED BY "+qr+"; DROP ROLE "+qr); err != nil {
				errs = append(errs, fmt.Errorf("role %s: %w", r, err))
			}
		}
	}
	return errors.Join(errs...)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
