package config

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store"
)

// Runtime is what a Config is built into: the store, one engine per
// target and the broker over them. brokerd serves Broker and Endpoints
// over gRPC, calls Broker.Start, and on shutdown calls Close.
type Runtime struct {
	Config *Config
	Broker *broker.Broker
	Store  *store.Store
	// Databases maps target names to their engines.
	Databases map[string]broker.Database
	// Endpoints maps target names to where issued users connect.
	Endpoints map[string]broker.Endpoint
	// RootCredentials re-reads and rotates the targets' admin passwords.
	RootCredentials *RootCredentials
	// Audit is the audit log (nil when audit.path is not set). The broker
	// writes lifecycle events to it; the gRPC server, its requests.
	Audit *audit.Log
}

// Build opens the store, connects to every target, checks every role's
// proxy role on its target, and constructs the broker (not yet started).
// Errors name the key they are about ("targets[0]", "roles[1].proxy_role")
// and, as in Validate, every proxy role is checked before Build gives up.
// On error everything opened so far is closed again.
func Build(ctx context.Context, cfg *Config, logger *slog.Logger) (*Runtime, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	rt := &Runtime{
		Config:    cfg,
		Databases: make(map[string]broker.Database, len(cfg.Targets)),
		Endpoints: make(map[string]broker.Endpoint, len(cfg.Targets)),
	}
	ok := false
	defer func() {
		if !ok {
			_ = rt.Close()
		}
	}()

	var err error
	rt.Store, err = store.Open(cfg.Store.Path, store.Options{Timeout: cfg.Store.OpenTimeout, Logger: logger})
	if err != nil {
		return nil, fmt.Errorf("store.path: %w", err)
	}

	rt.RootCredentials = newRootCredentials(logger)
	if err := connectTargets(ctx, cfg, logger, rt.Databases, rt.Endpoints, rt.RootCredentials); err != nil {
		return nil, err
	}
	if err := checkProxyRoles(ctx, cfg, rt.Databases); err != nil {
		return nil, err
	}

	var auditor broker.Auditor
	if cfg.Security.Audit.Path != "" {
		// Opened before the broker exists, so that what start-up
		// reconciliation drops is on the record too.
		rt.Audit, err = audit.Open(cfg.Security.Audit.Path, audit.Options{
			HMACKey: secretBytes(cfg.Security.Audit.HMACKey),
			Logger:  logger,
		})
		if err != nil {
			return nil, fmt.Errorf("audit.path: %w", err)
		}
		auditor = rt.Audit
	}

	rt.Broker, err = broker.New(broker.Config{
		Auditor:             auditor,
		Store:               rt.Store,
		Databases:           rt.Databases,
		Roles:               cfg.Roles,
		Logger:              logger,
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
	})
	if err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	ok = true
	return rt, nil
}

// Close stops the broker's background loops, then closes the engines and
// the store, in that order, so no loop touches a closed engine. It is safe
// to call on a partly built Runtime and more than once.
func (rt *Runtime) Close() error {
	var errs []error
	if rt.Broker != nil {
		if err := rt.Broker.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close broker: %w", err))
		}
		rt.Broker = nil
	}
	for name, db := range rt.Databases {
		db.Close()
		delete(rt.Databases, name)
	}
	if rt.Store != nil {
		if err := rt.Store.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close store: %w", err))
		}
		rt.Store = nil
	}
	if rt.Audit != nil {
		if err := rt.Audit.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close audit log: %w", err))
		}
		rt.Audit = nil
	}
	return errors.Join(errs...)
}

// CheckTargets connects to every target and checks every role's proxy
// role, as Build does, without opening the store (which a running brokerd
// holds locked): for `brokerd check --connect` before a restart.
func CheckTargets(ctx context.Context, cfg *Config, logger *slog.Logger) error {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	dbs := map[string]broker.Database{}
	defer func() {
		for _, db := range dbs {
			db.Close()
		}
	}()
	if err := connectTargets(ctx, cfg, logger, dbs, map[string]broker.Endpoint{}, nil); err != nil {
		return err
	}
	return checkProxyRoles(ctx, cfg, dbs)
}

// connectTargets opens one engine per target into dbs (so the caller can
// close what was opened even on error).
// rc, if set, receives each target's password source (see connectTarget).
func connectTargets(ctx context.Context, cfg *Config, logger *slog.Logger, dbs map[string]broker.Database, endpoints map[string]broker.Endpoint, rc *RootCredentials) error {
	for i, t := range cfg.Targets {
		engine, err := connectTarget(ctx, t, logger, rc)
		if err != nil {
			// The engine's errors never hold the password or the DSN.
			return fmt.Errorf("targets[%d] (%s): %w", i, t.Name, err)
		}
		dbs[t.Name] = engine
		endpoints[t.Name] = engine.Endpoint()
	}
	return nil
}

// checkProxyRoles checks every role's proxy role on its target and reports
// every failure, not only the first.
func checkProxyRoles(ctx context.Context, cfg *Config, dbs map[string]broker.Database) error {
	var errs []error
	for i, r := range cfg.Roles {
		db, ok := dbs[r.Target]
		if !ok {
			errs = append(errs, fmt.Errorf("roles[%d].target: unknown target %q", i, r.Target))
			continue
		}
		if err := db.CheckProxyRole(ctx, r.ProxyRole); err != nil {
			errs = append(errs, fmt.Errorf("roles[%d].proxy_role: target %s: %w", i, r.Target, err))
		}
	}
	return errors.Join(errs...)
}
