package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/privcheck"
	"github.com/credbroker/credbroker/server/config"
)

// A target that cannot be reached when brokerd starts does not keep it
// from starting: the other targets are served, and the unreachable one is
// connected in the background as soon as it answers. Only "unreachable"
// (broker.ErrUnavailable: refused, timed out, shutting down, too many
// connections) is deferred; a wrong password, a missing grant or proxy
// role is configuration, and still fails the start.
//
// Health: the server's health ("") stays SERVING while any target may be
// served, and each target has a health service of its own,
// TargetHealthService(name), SERVING once connected. A probe that must
// know that every target is up checks those.

// TargetHealthService is the grpc.health.v1 service name that reports
// whether brokerd is connected to the target name.
func TargetHealthService(name string) string { return "credbroker.target." + name }

// Reconnect backoff of a target unreachable at start-up: the first retry
// after reconnectBaseDelay, doubling up to reconnectMaxDelay. A request
// for the target retries sooner, but not more often than every
// reconnectBaseDelay.
const (
	reconnectBaseDelay = 500 * time.Millisecond
	reconnectMaxDelay  = 30 * time.Second
)

// lateTarget is the broker.Database of a target that was unreachable at
// start-up: until its connect loop (Daemon.connectLate) succeeds, every
// call is broker.ErrUnavailable; then it is the target's Engine.
type lateTarget struct {
	endpoint broker.Endpoint
	engine   atomic.Pointer[postgres.Engine]
	kick     chan struct{} // a request found it down: retry soon
}

var (
	_ broker.Database        = (*lateTarget)(nil)
	_ broker.UsersDeleter    = (*lateTarget)(nil)
	_ broker.PasswordHasher  = (*lateTarget)(nil)
	_ broker.MarkerClaimer   = (*lateTarget)(nil)
	_ broker.ActivitySampler = (*lateTarget)(nil)
	_ broker.DatabaseClock   = (*lateTarget)(nil)
	_ privcheck.Checker      = (*lateTarget)(nil)
)

func newLateTarget(t config.Target) (*lateTarget, error) {
	ep, err := postgres.TargetEndpoint(t.URL)
	if err != nil {
		return nil, err
	}
	return &lateTarget{endpoint: ep, kick: make(chan struct{}, 1)}, nil
}

func (t *lateTarget) get() (*postgres.Engine, error) {
	if e := t.engine.Load(); e != nil {
		return e, nil
	}
	select {
	case t.kick <- struct{}{}:
	default:
	}
	return nil, fmt.Errorf("%w: not connected: unreachable since start-up, reconnecting", broker.ErrUnavailable)
}

func (t *lateTarget) NewUser(ctx context.Context, req broker.NewUserRequest) error {
	e, err := t.get()
	if err != nil {
		return err
	}
	return e.NewUser(ctx, req)
}

func (t *lateTarget) HashPassword(password string) (string, error) {
	e, err := t.get()
	if err != nil {
		return "", err // NewUser hashes it then
	}
	return e.HashPassword(password)
}

func (t *lateTarget) RenewUser(ctx context.Context, req broker.RenewUserRequest) error {
	e, err := t.get()
	if err != nil {
		return err
	}
	return e.RenewUser(ctx, req)
}

func (t *lateTarget) RenewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	e, err := t.get()
	if err != nil {
		return fill(len(reqs), err)
	}
	return e.RenewUsers(ctx, reqs)
}

func (t *lateTarget) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	e, err := t.get()
	if err != nil {
		return err
	}
	return e.DeleteUser(ctx, req)
}

func (t *lateTarget) DeleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	e, err := t.get()
	if err != nil {
		return fill(len(reqs), err)
	}
	return e.DeleteUsers(ctx, reqs)
}

// Now is the server's clock, once connected: the expiry manager's check
// against the database's clock (broker.DatabaseClock) and brokerd's
// lease clock (dbclock.go) hold for a target that was down at start-up.
func (t *lateTarget) Now(ctx context.Context) (time.Time, error) {
	e, err := t.get()
	if err != nil {
		return time.Time{}, err
	}
	return e.Now(ctx)
}

func (t *lateTarget) ListManagedUsers(ctx context.Context) ([]string, error) {
	e, err := t.get()
	if err != nil {
		return nil, err
	}
	return e.ListManagedUsers(ctx)
}

func (t *lateTarget) SampleSessions(ctx context.Context) ([]broker.Session, error) {
	e, err := t.get()
	if err != nil {
		return nil, err
	}
	return e.SampleSessions(ctx)
}

func (t *lateTarget) CheckProxyRole(ctx context.Context, proxyRole string) error {
	e, err := t.get()
	if err != nil {
		return err
	}
	return e.CheckProxyRole(ctx, proxyRole)
}

func (t *lateTarget) ClaimMarker(ctx context.Context, group string) error {
	e, err := t.get()
	if err != nil {
		return err
	}
	return e.ClaimMarker(ctx, group)
}

func (t *lateTarget) CheckPrivileges(ctx context.Context, uses []privcheck.ProxyRoleUse) ([]privcheck.Finding, error) {
	e, err := t.get()
	if err != nil {
		return nil, err
	}
	return e.CheckPrivileges(ctx, uses)
}

func (t *lateTarget) Endpoint() broker.Endpoint { return t.endpoint }

// Close closes the engine, if connected. Daemon.Close calls it after the
// connect loop has ended.
func (t *lateTarget) Close() {
	if e := t.engine.Load(); e != nil {
		e.Close()
	}
}

func fill(n int, err error) []error {
	errs := make([]error, n)
	for i := range errs {
		errs[i] = err
	}
	return errs
}

// connectLate connects the target t (targets[i]) in the background until
// it succeeds or ctx ends: through the root credentials, as at start-up,
// then checking its roles' proxy roles. A failure other than
// unavailability (the password changed meanwhile, a proxy role dropped)
// is logged as an error and retried at the longest delay.
func (d *Daemon) connectLate(ctx context.Context, i int, t config.Target, lt *lateTarget) {
	log := d.log.With("target", t.Name)
	delay := reconnectBaseDelay
	for {
		timer := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		case <-lt.kick:
			timer.Stop()
			// Not more often than every reconnectBaseDelay, however many
			// requests ask.
			select {
			case <-ctx.Done():
				return
			case <-time.After(reconnectBaseDelay):
			}
		}
		engine, err := d.rootCreds.Connect(ctx, t)
		if err == nil {
			err = checkProxyRoles(ctx, d.cfg, map[string]broker.Database{t.Name: engine})
			if err != nil {
				engine.Close()
			}
		}
		if err == nil {
			lt.engine.Store(engine)
			d.drainer.HealthServer().SetServingStatus(TargetHealthService(t.Name), healthpb.HealthCheckResponse_SERVING)
			log.Info("connected to a target that was unreachable at start-up")
			return
		}
		if ctx.Err() != nil {
			return
		}
		level := slog.LevelWarn
		if !errors.Is(err, broker.ErrUnavailable) {
			level = slog.LevelError
			delay = reconnectMaxDelay
		}
		delay = min(2*delay, reconnectMaxDelay)
		log.Log(ctx, level, "target still not connected", "key", fmt.Sprintf("targets[%d]", i), "retry_in", delay, "err", err)
	}
}
