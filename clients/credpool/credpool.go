// Package credpool is a pgx v5 connection pool that lives with short-lived
// credentials from credbroker. A Keeper holds the credential; every new
// connection logs in with the current one (BeforeConnect), and after a
// replacement connections of the old user are retired as soon as they are
// idle: one returned to the pool is closed instead of kept, one found idle
// is closed instead of handed out. The Keeper's overlap gives in-flight
// queries on old connections time to finish before the old user is
// dropped, so a workload sees no failed query across replacements.
package credpool

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/credbroker/credbroker/clients/credbroker"
)

// Options configure New.
type Options struct {
	// Keeper says which credential to keep (role, TTL, overlap...). Its
	// OnEvent is called too, after the pool's own handling.
	Keeper credbroker.KeeperOptions
	// Configure, if set, adjusts the pool configuration (MaxConns, health
	// check period, ...) parsed from the first credential's DSN. It must
	// not replace BeforeConnect, PrepareConn or AfterRelease.
	Configure func(*pgxpool.Config)
	// RevokeOnClose revokes the credentials when the pool is closed.
	RevokeOnClose bool
}

// Pool is a *pgxpool.Pool whose credentials are replaced underneath it.
type Pool struct {
	*pgxpool.Pool
	keeper *credbroker.Keeper
	opts   Options

	mu      sync.Mutex
	user    string        // the current credential's user
	changed chan struct{} // closed and replaced when the credential changes

	cancel context.CancelFunc
	done   chan struct{}
}

// New starts a Keeper on c, waits for the first credential (or ctx), and
// returns a pool that uses it.
func New(ctx context.Context, c *credbroker.Client, opts Options) (*Pool, error) {
	p := &Pool{opts: opts, changed: make(chan struct{}), done: make(chan struct{})}
	ko := opts.Keeper
	userHook := ko.OnEvent
	ko.OnEvent = func(ev credbroker.Event) {
		p.onEvent(ev)
		if userHook != nil {
			userHook(ev)
		}
	}
	p.keeper = c.NewKeeper(ko)
	runCtx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	go func() {
		defer close(p.done)
		_ = p.keeper.Run(runCtx)
	}()
	select {
	case <-p.keeper.Ready():
	case <-ctx.Done():
		p.stop()
		return nil, fmt.Errorf("credpool: waiting for the first credential: %w", ctx.Err())
	}
	_, cred, _ := p.keeper.Current()
	cfg, err := pgxpool.ParseConfig(cred.DSN)
	if err != nil {
		p.stop()
		// pgx's parse errors can quote the connection string: say no more.
		return nil, errors.New("credpool: the credential's DSN does not parse")
	}
	if opts.Configure != nil {
		opts.Configure(cfg)
	}
	cfg.BeforeConnect = p.beforeConnect
	cfg.PrepareConn = func(_ context.Context, conn *pgx.Conn) (bool, error) {
		// Idle and of a replaced user: close it, connect afresh.
		return p.isCurrent(conn), nil
	}
	cfg.AfterRelease = p.isCurrent
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		p.stop()
		return nil, fmt.Errorf("credpool: %w", err)
	}
	p.Pool = pool
	return p, nil
}

// Keeper is the Keeper behind the pool, for its Events and Current.
func (p *Pool) Keeper() *credbroker.Keeper { return p.keeper }

func (p *Pool) onEvent(ev credbroker.Event) {
	switch ev.Type {
	case credbroker.EventIssued, credbroker.EventReplaced:
		p.mu.Lock()
		p.user = ev.Credential.Username
		close(p.changed)
		p.changed = make(chan struct{})
		p.mu.Unlock()
	case credbroker.EventRevoked, credbroker.EventExpired, credbroker.EventNotFound:
		// The current user is gone: its connections are useless.
		p.mu.Lock()
		p.user = ""
		p.mu.Unlock()
	}
}

func (p *Pool) isCurrent(conn *pgx.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.user != "" && conn.Config().User == p.user
}

// beforeConnect logs in with the current credential, waiting for one
// while the Keeper issues a fresh one for a lost credential.
func (p *Pool) beforeConnect(ctx context.Context, cc *pgx.ConnConfig) error {
	for {
		p.mu.Lock()
		changed := p.changed
		p.mu.Unlock()
		if _, cred, ok := p.keeper.Current(); ok {
			cc.User = cred.Username
			cc.Password = cred.Password
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("credpool: no current credential: %w", ctx.Err())
		}
	}
}

// Close closes the pool and stops the Keeper; with RevokeOnClose it then
// revokes the credentials.
func (p *Pool) Close() {
	p.Pool.Close()
	p.stop()
	if p.opts.RevokeOnClose {
		_ = p.keeper.Revoke(context.Background())
	}
}

func (p *Pool) stop() {
	p.cancel()
	<-p.done
}
