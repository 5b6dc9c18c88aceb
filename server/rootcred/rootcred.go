package rootcred

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// adminEngine is what root-credential handling needs of a target's engine.
type adminEngine interface {
	SetPassword(password string)
	RotatePassword(ctx context.Context, password string) error
	TryPassword(ctx context.Context, password string) error
}

// Credentials keeps the targets' admin passwords: it connects each target
// with the password at its source (Connect), re-reads each source for
// changes (Watch), keeps Vault tokens alive, and rotates a target's
// password (Rotate). A running brokerd has one.
type Credentials struct {
	log     *slog.Logger
	mu      sync.Mutex
	targets map[string]*rootCredential
}

// rootCredential is one target's.
type rootCredential struct {
	target string
	src    rootSource
	engine adminEngine
	mu     sync.Mutex // one rotation or refresh at a time
	inUse  string     // the password the engine was last given
}

var _ server.RootRotator = (*Credentials)(nil)

// New returns an empty Credentials; Connect fills it.
func New(log *slog.Logger) *Credentials {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Credentials{log: log, targets: map[string]*rootCredential{}}
}

func (rc *Credentials) add(target string, src rootSource, engine adminEngine, inUse string) {
	rc.mu.Lock()
	rc.targets[target] = &rootCredential{target: target, src: src, engine: engine, inUse: inUse}
	rc.mu.Unlock()
}

func (rc *Credentials) get(target string) (*rootCredential, bool) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	c, ok := rc.targets[target]
	return c, ok
}

// newSource returns a target's password source; a Vault source logs in.
func newSource(ctx context.Context, t config.Target, logger *slog.Logger) (rootSource, error) {
	switch {
	case t.Vault != nil:
		return newVaultSource(ctx, t.Vault, logger)
	case t.PasswordFile != "":
		if _, _, err := ReadSecretFile(t.PasswordFile); err != nil {
			return nil, err
		}
		return &fileSource{path: t.PasswordFile}, nil
	default:
		pw, err := ReadSecretEnv(t.PasswordEnv)
		if err != nil {
			return nil, err
		}
		return &envSource{name: t.PasswordEnv, password: pw.Reveal()}, nil
	}
}

// Connect reads the target's admin password from its source, connects,
// and registers the target for Watch and Rotate. A rotation that a crash
// interrupted is settled first (see connect).
func (rc *Credentials) Connect(ctx context.Context, t config.Target) (*postgres.Engine, error) {
	return connect(ctx, t, rc.log, rc)
}

// Connect reads the target's admin password from its source and connects,
// writing nothing back: for the check commands, beside a running brokerd.
func Connect(ctx context.Context, t config.Target, logger *slog.Logger) (*postgres.Engine, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return connect(ctx, t, logger, nil)
}

// connect reads the target's password from its source and connects.
// A rotation interrupted by a crash left the new password as pending: the
// server has whichever of the two it accepts. With rc set (brokerd), the
// source is then settled — pending committed or dropped — and the target
// registered for Watch and Rotate; without (the check commands), nothing
// is written.
func connect(ctx context.Context, t config.Target, logger *slog.Logger, rc *Credentials) (*postgres.Engine, error) {
	src, err := newSource(ctx, t, logger.With("target", t.Name))
	if err != nil {
		return nil, fmt.Errorf("admin password (%s): %w", t.PasswordSource, err)
	}
	st, err := src.read(ctx)
	if err != nil {
		return nil, fmt.Errorf("admin password (%s): %w", src.describe(), err)
	}
	connect := func(pw string) (*postgres.Engine, error) {
		return postgres.New(ctx, postgres.Config{
			URL:             t.URL,
			Password:        pw,
			MarkerRole:      t.MarkerRole,
			MaxConns:        int32(t.MaxConns),
			ConnectTimeout:  t.ConnectTimeout,
			ScramIterations: t.ScramIterations,
			Logger:          logger.With("target", t.Name),
		})
	}
	engine, err := connect(st.current)
	inUse := st.current
	switch {
	case err == nil && st.pending != "":
		// The server still has the current password: the rotation never
		// reached ALTER ROLE.
		if rc != nil {
			if aerr := src.abort(ctx, st); aerr != nil {
				engine.Close()
				return nil, fmt.Errorf("admin password (%s): dropping an interrupted rotation: %w", src.describe(), aerr)
			}
			logger.Warn("an interrupted rotation of the admin password never reached PostgreSQL; dropped it",
				"target", t.Name, "source", src.describe())
		}
	case err != nil && st.pending != "" && postgres.IsAuthFailure(err):
		engine, err = connect(st.pending)
		if err != nil {
			return nil, err
		}
		inUse = st.pending
		if rc != nil {
			if cerr := src.commit(ctx, st); cerr != nil {
				engine.Close()
				return nil, fmt.Errorf("admin password (%s): completing an interrupted rotation: %w", src.describe(), cerr)
			}
			logger.Warn("completed an interrupted rotation of the admin password", "target", t.Name, "source", src.describe())
		}
	case err != nil:
		return nil, err
	}
	if rc != nil {
		rc.add(t.Name, src, engine, inUse)
	}
	return engine, nil
}

// RotateResult says what a rotation did.
type RotateResult struct {
	Target string
	// Source is where the new password was stored ("file /path", "vault ...").
	Source string
	Time   time.Time
}

// ErrRotateUnknownTarget is returned by Rotate for a target brokerd does
// not serve.
var ErrRotateUnknownTarget = server.ErrUnknownTarget

// ErrRotateNotWritable is returned by Rotate for a target whose password
// comes from an environment variable.
var ErrRotateNotWritable = errNotWritable

// Rotate gives the target's admin role a new random password and stores
// it at the password's source, in an order that survives a crash at any
// point: the new password is written as pending first, then set in
// PostgreSQL, then made current (see connect for the recovery). A
// rotation left pending by an earlier failure is settled first.
func (rc *Credentials) Rotate(ctx context.Context, target string) (RotateResult, error) {
	c, ok := rc.get(target)
	if !ok {
		return RotateResult{}, fmt.Errorf("%w %q", ErrRotateUnknownTarget, target)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	st, err := c.src.read(ctx)
	if err != nil {
		return RotateResult{}, fmt.Errorf("reading the admin password (%s): %w", c.src.describe(), err)
	}
	if st.pending != "" {
		if st, err = c.settle(ctx, st); err != nil {
			return RotateResult{}, err
		}
	}
	// The same generator as issued users' passwords: 32 characters of
	// [A-Za-z0-9], about 190 bits.
	next := broker.NewPassword()
	staged, err := c.src.stage(ctx, st, next)
	if err != nil {
		return RotateResult{}, fmt.Errorf("recording the new admin password (%s): %w", c.src.describe(), err)
	}
	if err := c.engine.RotatePassword(ctx, next); err != nil {
		// Did the ALTER ROLE commit before the error? Ask the server.
		if c.engine.TryPassword(ctx, next) != nil {
			if c.engine.TryPassword(ctx, st.current) == nil {
				_ = c.src.abort(ctx, staged)
				return RotateResult{}, fmt.Errorf("setting the new admin password: %w (nothing changed)", err)
			}
			return RotateResult{}, fmt.Errorf("setting the new admin password: %w; PostgreSQL could not be asked "+
				"which password it has now: the new one stays recorded as pending at %s, and is settled at the next "+
				"start or rotation", err, c.src.describe())
		}
		c.engine.SetPassword(next)
	}
	c.inUse = next
	if err := c.src.commit(ctx, staged); err != nil {
		// The broker works with the new password; the source holds it as
		// pending, which the next start or rotation completes.
		return RotateResult{}, fmt.Errorf("PostgreSQL has the new admin password, but storing it as current at %s failed: %w "+
			"(it is recorded as pending there; the next start or rotation completes it)", c.src.describe(), err)
	}
	rc.log.Info("rotated the admin password", "target", target, "source", c.src.describe())
	return RotateResult{Target: target, Source: c.src.describe(), Time: time.Now()}, nil
}

// settle finishes or drops a pending rotation: the server decides which
// password is the real one.
func (c *rootCredential) settle(ctx context.Context, st rootState) (rootState, error) {
	switch {
	case c.engine.TryPassword(ctx, st.pending) == nil:
		if err := c.src.commit(ctx, st); err != nil {
			return st, fmt.Errorf("completing an interrupted rotation (%s): %w", c.src.describe(), err)
		}
		c.engine.SetPassword(st.pending)
		c.inUse = st.pending
		return c.src.read(ctx)
	case c.engine.TryPassword(ctx, st.current) == nil:
		if err := c.src.abort(ctx, st); err != nil {
			return st, fmt.Errorf("dropping an interrupted rotation (%s): %w", c.src.describe(), err)
		}
		return c.src.read(ctx)
	default:
		return st, fmt.Errorf("PostgreSQL accepts neither the current nor the pending admin password at %s", c.src.describe())
	}
}

// RotateRoot is Rotate for the gRPC server (server.RootRotator).
func (rc *Credentials) RotateRoot(ctx context.Context, target string) (server.RootRotation, error) {
	res, err := rc.Rotate(ctx, target)
	return server.RootRotation{Target: res.Target, Source: res.Source, Time: res.Time}, err
}

// Refresh re-reads every target's password source once and hands a
// changed password to the engine, if the server accepts it (an operator
// who rotated it by hand, or another tool writing Vault). A pending
// rotation is left to Rotate and start-up. It returns the targets whose
// password changed.
func (rc *Credentials) Refresh(ctx context.Context) []string {
	rc.mu.Lock()
	all := make([]*rootCredential, 0, len(rc.targets))
	for _, c := range rc.targets {
		all = append(all, c)
	}
	rc.mu.Unlock()
	var changed []string
	for _, c := range all {
		if c.refresh(ctx, rc.log) {
			changed = append(changed, c.target)
		}
	}
	return changed
}

func (c *rootCredential) refresh(ctx context.Context, log *slog.Logger) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, env := c.src.(*envSource); env {
		return false
	}
	st, err := c.src.read(ctx)
	if err != nil {
		log.Warn("re-reading the admin password failed; keeping the one in use", "target", c.target,
			"source", c.src.describe(), "err", err)
		return false
	}
	if st.current == c.inUse || st.pending != "" {
		return false
	}
	switch err := c.engine.TryPassword(ctx, st.current); {
	case err == nil:
		c.engine.SetPassword(st.current)
		c.inUse = st.current
		log.Info("the admin password changed at its source; new connections use it", "target", c.target, "source", c.src.describe())
		return true
	case errors.Is(err, postgres.ErrAuthFailed):
		log.Warn("the admin password at its source changed, but PostgreSQL refuses it; keeping the one in use",
			"target", c.target, "source", c.src.describe())
	default:
		log.Warn("could not try the changed admin password", "target", c.target, "err", err)
	}
	return false
}

// Watch re-reads the password sources every refresh interval (the
// shortest of the targets'), and keeps Vault tokens alive, until ctx is
// done.
func (rc *Credentials) Watch(ctx context.Context) {
	rc.mu.Lock()
	interval := time.Duration(0)
	var wg sync.WaitGroup
	for _, c := range rc.targets {
		if d := c.src.refreshInterval(); d > 0 && (interval == 0 || d < interval) {
			interval = d
		}
		if v, ok := c.src.(*vaultSource); ok {
			wg.Add(1)
			go func() {
				defer wg.Done()
				v.keepAlive(ctx)
			}()
		}
	}
	rc.mu.Unlock()
	defer wg.Wait()
	if interval == 0 {
		<-ctx.Done()
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			rc.Refresh(ctx)
		}
	}
}
