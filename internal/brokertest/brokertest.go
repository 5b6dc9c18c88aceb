// Package brokertest runs a whole credbroker in-process for tests of what
// talks to it (the Go client, the pool helper, broker-agent): a real
// PostgreSQL target from pgtest, a real bbolt file in t.TempDir(), and the
// real gRPC server on a loopback TCP port, which survives Restart so that
// clients reconnect to the same address. The test package's TestMain must
// run pgtest.Main.
package brokertest

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/store"
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
}

// Broker is a running broker. Its methods are safe for concurrent use.
type Broker struct {
	t      testing.TB
	opts   Options
	Target *pgtest.Target
	Engine *postgres.Engine
	// Addr is the gRPC listen address, the same across restarts.
	Addr      string
	storePath string

	mu      sync.Mutex
	broker  *broker.Broker
	store   *store.Store
	gs      *grpc.Server
	drainer *server.Drainer
	served  chan struct{}
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
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfg := tg.EngineConfig()
	cfg.Logger = opts.Logger
	eng, err := postgres.New(ctx, cfg)
	if err != nil {
		t.Fatalf("brokertest: postgres.New: %v", err)
	}
	b := &Broker{t: t, opts: opts, Target: tg, Engine: eng, storePath: filepath.Join(t.TempDir(), "leases.db")}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("brokertest: listen: %v", err)
	}
	b.Addr = lis.Addr().String()
	if err := b.start(lis); err != nil {
		t.Fatalf("brokertest: %v", err)
	}
	t.Cleanup(func() {
		b.Stop()
		eng.Close()
	})
	return b
}

func (b *Broker) start(lis net.Listener) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := store.Open(b.storePath, store.Options{NoSync: true})
	if err != nil {
		_ = lis.Close()
		return err
	}
	roles := make([]broker.Role, 0, len(b.opts.Roles))
	for _, r := range b.opts.Roles {
		roles = append(roles, broker.Role{Name: r.Name, Target: "main", ProxyRole: b.Target.ProxyRoles["read_only"],
			DefaultTTL: r.DefaultTTL, MaxTTL: r.MaxTTL})
	}
	br, err := broker.New(broker.Config{
		Store:           st,
		Databases:       map[string]broker.Database{"main": b.Engine},
		Roles:           roles,
		Clock:           b.opts.Clock,
		Logger:          b.opts.Logger,
		DisconnectGrace: b.opts.DisconnectGrace,
	})
	if err == nil {
		err = br.Start(ctx)
	}
	if err != nil {
		_ = st.Close()
		_ = lis.Close()
		return err
	}
	drainer := server.NewDrainer()
	gs := server.NewGRPCServer(server.Config{
		Broker:    br,
		Logger:    b.opts.Logger,
		Endpoints: map[string]broker.Endpoint{"main": b.Engine.Endpoint()},
		SSLMode:   "disable",
		Drainer:   drainer,
	})
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = gs.Serve(lis)
	}()
	b.mu.Lock()
	b.broker, b.store, b.gs, b.drainer, b.served = br, st, gs, drainer, served
	b.mu.Unlock()
	return nil
}

// Broker returns the running broker (nil while stopped).
func (b *Broker) Broker() *broker.Broker {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.broker
}

// Stop stops serving as brokerd does on SIGTERM (streams drained first);
// the store and the PostgreSQL users stay. Stopping twice is a no-op.
func (b *Broker) Stop() {
	b.mu.Lock()
	br, st, gs, drainer, served := b.broker, b.store, b.gs, b.drainer, b.served
	b.broker, b.store, b.gs = nil, nil, nil
	b.mu.Unlock()
	if gs == nil {
		return
	}
	drainer.Drain()
	gs.Stop()
	<-served
	_ = br.Close()
	_ = st.Close()
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
