package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/rootcred"
)

// Check runs what Start checks before it serves, without opening the store
// (which a running brokerd holds locked) or binding a socket: every secret
// the configuration names is read, the TLS files are loaded, and, with
// connect, every target is connected and every role's proxy role checked
// there. It writes nothing (an interrupted root rotation is left for
// brokerd to settle). For `brokerd check` before a restart. It returns the
// warnings of reading the secrets.
func Check(ctx context.Context, cfg *config.Config, connect bool, logger *slog.Logger) (warnings []string, err error) {
	warnings, err = rootcred.Check(cfg)
	if err != nil {
		return warnings, err
	}
	if _, err := newSecurity(cfg.Security, nil, logger); err != nil {
		return warnings, err
	}
	if !connect {
		return warnings, nil
	}
	dbs, err := ConnectTargets(ctx, cfg, logger)
	defer func() {
		for _, db := range dbs {
			db.Close()
		}
	}()
	if err != nil {
		return warnings, err
	}
	return warnings, checkProxyRoles(ctx, cfg, dbs)
}

// ConnectTargets connects to every target of cfg with the admin password
// at its source, writing nothing back, for the check commands beside a
// running brokerd. The caller closes the engines, also those returned
// with an error.
func ConnectTargets(ctx context.Context, cfg *config.Config, logger *slog.Logger) (map[string]broker.Database, error) {
	dbs := map[string]broker.Database{}
	err := connectTargets(ctx, cfg, func(ctx context.Context, t config.Target) (*postgres.Engine, error) {
		return rootcred.Connect(ctx, t, logger)
	}, dbs)
	return dbs, err
}

// connectTargets opens one engine per target into dbs (so the caller can
// close what was opened even on error).
func connectTargets(ctx context.Context, cfg *config.Config, connect func(context.Context, config.Target) (*postgres.Engine, error), dbs map[string]broker.Database) error {
	for i, t := range cfg.Targets {
		engine, err := connect(ctx, t)
		if err != nil {
			// The engine's errors never hold the password or the DSN.
			return fmt.Errorf("targets[%d] (%s): %w", i, t.Name, err)
		}
		dbs[t.Name] = engine
	}
	return nil
}

// checkProxyRoles checks the proxy role of every role whose target is in
// dbs and reports every failure, not only the first. A target missing from
// dbs is checked when it is connected (see connectLate).
func checkProxyRoles(ctx context.Context, cfg *config.Config, dbs map[string]broker.Database) error {
	var errs []error
	for i, r := range cfg.Roles {
		db, ok := dbs[r.Target]
		if !ok {
			if !slices.Contains(cfg.TargetNames(), r.Target) {
				errs = append(errs, fmt.Errorf("roles[%d].target: unknown target %q", i, r.Target))
			}
			continue
		}
		if err := db.CheckProxyRole(ctx, r.ProxyRole); err != nil {
			errs = append(errs, fmt.Errorf("roles[%d].proxy_role: target %s: %w", i, r.Target, err))
		}
	}
	return errors.Join(errs...)
}

// connectAll connects every target for Start, into d.databases. A
// target that cannot be reached (broker.ErrUnavailable) becomes a
// lateTarget, returned by index, for connectLate; any other failure is
// the start's. The proxy roles of the targets connected are checked.
func (d *Daemon) connectAll(ctx context.Context) (map[int]*lateTarget, error) {
	late := map[int]*lateTarget{}
	connected := map[string]broker.Database{}
	for i, t := range d.cfg.Targets {
		engine, err := d.rootCreds.Connect(ctx, t)
		switch {
		case err == nil:
			d.databases[t.Name], connected[t.Name] = engine, engine
		case errors.Is(err, broker.ErrUnavailable) && ctx.Err() == nil:
			lt, lerr := newLateTarget(t)
			if lerr != nil {
				return nil, fmt.Errorf("targets[%d] (%s): %w", i, t.Name, lerr)
			}
			d.log.Warn("target unreachable at start-up; serving the others and connecting it in the background",
				"key", fmt.Sprintf("targets[%d]", i), "target", t.Name, "err", err)
			d.databases[t.Name], late[i] = lt, lt
		default:
			// The engine's errors never hold the password or the DSN.
			return nil, fmt.Errorf("targets[%d] (%s): %w", i, t.Name, err)
		}
	}
	return late, checkProxyRoles(ctx, d.cfg, connected)
}
