// Package brokertest runs a whole credbroker in-process for tests of what
// talks to it (the Go client, the pool helper, broker-agent): a real
// PostgreSQL target from pgtest, a real bbolt file in t.TempDir(), and the
// real gRPC server on a loopback TCP port, which survives Restart so that
// clients reconnect to the same address. It starts the broker from a
// configuration file through package daemon, as brokerd does. The test package's TestMain must
// run pgtest.Main.
package brokertest

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
)

// Role is a broker role on the target's read_only proxy role.
type Role struct {
	Name               string
	DefaultTTL, MaxTTL time.Duration
}

// Options shape a Broker. Zero values have defaults.
type Options struct {
	// Roles default to read_only (10m default, 1h max).
	Roles []Role
	// DisconnectGrace is the broker's revoke_on_disconnect grace (default 30s).
	DisconnectGrace time.Duration
	// Logger receives the broker's and server's logs (default: discard).
	Logger *slog.Logger
	// Clock is the broker's clock (default: real).
	Clock broker.Clock
	// VaultAPI serves the Vault-compatible API on a loopback port
	// (VaultAddr), mount database.
	VaultAPI bool
}

// Broker is a running broker. Its methods are safe for concurrent use.
type Broker struct {
	t      testing.TB
	dir    string  // the configuration's and the store's directory
	opts   Options // what the configuration was written from
	cfg    *config.Config
	log    *slog.Logger
	clock  broker.Clock
	Target *pgtest.Target
	// Addr is the gRPC listen address, the same across restarts.
	Addr string

	mu     sync.Mutex
	daemon *daemon.Daemon
	stop   context.CancelFunc
	served chan error
}

// Start starts a broker; it stops at the end of the test.
func Start(t testing.TB, opts Options) *Broker {
	t.Helper()
	if len(opts.Roles) == 0 {
		opts.Roles = []Role{{Name: "read_only", DefaultTTL: 10 * time.Minute, MaxTTL: time.Hour}}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	dir := t.TempDir()
	cfg, err := writeConfig(dir, tg, opts)
	if err != nil {
		t.Fatalf("brokertest: %v", err)
	}
	b := &Broker{t: t, dir: dir, opts: opts, cfg: cfg, log: opts.Logger, clock: opts.Clock, Target: tg}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("brokertest: listen: %v", err)
	}
	b.Addr = lis.Addr().String()
	if err := b.start(lis); err != nil {
		t.Fatalf("brokertest: %v", err)
	}
	t.Cleanup(b.Stop)
	return b
}

// writeConfig writes the target's admin password and a brokerd
// configuration into dir, and returns it validated: the harness starts
// the broker from a configuration, as brokerd does.
func writeConfig(dir string, tg *pgtest.Target, opts Options) (*config.Config, error) {
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		return nil, err
	}
	var y strings.Builder
	fmt.Fprintf(&y, "listen: 127.0.0.1:0\nstore: {path: %q}\n", filepath.Join(dir, "leases.db"))
	fmt.Fprintf(&y, "targets:\n  - {name: main, url: %q, password_file: %q, marker_role: %q}\n", tg.AdminURL, pw, tg.MarkerRole)
	y.WriteString("roles:\n")
	for _, r := range opts.Roles {
		fmt.Fprintf(&y, "  - {name: %q, target: main, proxy_role: %q, default_ttl: %s, max_ttl: %s}\n",
			r.Name, tg.ProxyRoles["read_only"], r.DefaultTTL, r.MaxTTL)
	}
	y.WriteString("dsn_sslmode: disable\nshutdown_timeout: 2s\n")
	if opts.DisconnectGrace > 0 {
		fmt.Fprintf(&y, "disconnect_grace: %s\n", opts.DisconnectGrace)
	}
	if opts.VaultAPI {
		y.WriteString("vault_api: {listen: 127.0.0.1:0}\n")
	}
	f, err := config.Parse([]byte(y.String()))
	if err != nil {
		return nil, err
	}
	return f.Validate()
}

func (b *Broker) start(lis net.Listener) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := daemon.Start(ctx, b.cfg, daemon.Options{
		Logger: b.log, Listener: lis, Clock: b.clock, StoreNoSync: true, SkipPrivilegeCheck: true,
	})
	if err != nil {
		return err
	}
	serveCtx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(serveCtx) }()
	<-d.Ready()
	b.mu.Lock()
	b.daemon, b.stop, b.served = d, stop, served
	b.mu.Unlock()
	return nil
}

// Broker returns the running broker (nil while stopped).
func (b *Broker) Broker() *broker.Broker {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.daemon == nil {
		return nil
	}
	return b.daemon.Broker()
}

// VaultAddr is the Vault API's URL (http://host:port) while the broker
// runs with Options.VaultAPI, else "". Its port changes across Restart.
func (b *Broker) VaultAddr() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.daemon == nil || b.daemon.VaultAPIAddr() == nil {
		return ""
	}
	return "http://" + b.daemon.VaultAPIAddr().String()
}

// Stop stops serving as brokerd does on SIGTERM (streams drained first);
// the store and the PostgreSQL users stay. Stopping twice is a no-op.
func (b *Broker) Stop() {
	b.mu.Lock()
	d, stop, served := b.daemon, b.stop, b.served
	b.daemon = nil
	b.mu.Unlock()
	if d == nil {
		return
	}
	stop()
	<-served
	_ = d.Close()
}

// Restart stops the broker and starts a new one on the same store file
// and address, as a process restart would.
func (b *Broker) Restart() {
	b.t.Helper()
	b.Stop()
	// Go listens with SO_REUSEADDR, so the port just released is free
	// again at once.
	lis, err := net.Listen("tcp", b.Addr)
	if err != nil {
		b.t.Fatalf("brokertest: listen again on %s: %v", b.Addr, err)
	}
	if err := b.start(lis); err != nil {
		b.t.Fatalf("brokertest: restart: %v", err)
	}
}

// RestartWithRoles restarts the broker, as Restart does, with its
// configuration's roles replaced by roles: a role removed from brokerd's
// configuration while leases of it are held.
func (b *Broker) RestartWithRoles(roles ...Role) {
	b.t.Helper()
	b.opts.Roles = roles
	cfg, err := writeConfig(b.dir, b.Target, b.opts)
	if err != nil {
		b.t.Fatalf("brokertest: %v", err)
	}
	b.Stop()
	b.cfg = cfg
	b.Restart()
}

// RoleExists asks PostgreSQL, as superuser, whether a user exists.
func (b *Broker) RoleExists(ctx context.Context, name string) (bool, error) {
	conn, err := pgxConnect(ctx, b.Target.SuperURL)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_roles WHERE rolname = $1", name).Scan(&n); err != nil {
		return false, fmt.Errorf("query pg_roles: %w", err)
	}
	return n == 1, nil
}
