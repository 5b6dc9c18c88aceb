package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/rootcred"
)

// Live reload (SIGHUP, brokerctl reload): the file is read and validated
// as at start-up, compared with the configuration in force, and applied
// only if every change can apply while brokerd runs. What is applied is
// swapped in whole, as immutable snapshots: the broker's roles and expiry
// settings (broker.Reconfigure), the authentication and authorization
// policy (livePolicy), the quotas (server.LiveQuotas), the log level and
// the Config itself. A call reads each snapshot once, so it sees the old
// settings or the new, never a mix of one kind; streams stay open.
//
// What needs a restart (the listeners, the store, the targets' connection
// settings, TLS, the audit log's path and key, the log format, any key
// this file does not know to be live) is refused by key, and nothing
// changes. So is an invalid file: every error is logged with its key path,
// credbroker_config_reload_failures_total grows, and /readyz shows why
// until a reload succeeds.

// reloadState is what Reload needs beyond the Daemon.
type reloadState struct {
	// path is the configuration file ("" refuses reloads).
	path string
	// level is the logger's level, set to log.level (nil: not live).
	level *slog.LevelVar
	// mu makes reloads one at a time.
	mu sync.Mutex
}

// ReloadConfig is Reload, for AdminService.ReloadConfig.
func (d *Daemon) ReloadConfig(ctx context.Context) (server.ConfigReload, error) {
	return d.Reload(ctx)
}

// Reload re-reads the configuration file and applies it (see above). It
// returns what changed, one line per key; its error wraps
// server.ErrConfigInvalid or server.ErrConfigNotLive when it applied
// nothing, and names the keys. The audit log is reopened (rotation) once
// the configuration is applied, even when nothing changed.
func (d *Daemon) Reload(ctx context.Context) (server.ConfigReload, error) {
	d.reload.mu.Lock()
	defer d.reload.mu.Unlock()
	path := d.reload.path
	res := server.ConfigReload{File: path}
	if path == "" {
		return res, d.reloadFailed(fmt.Errorf("%w: brokerd was started without a configuration file", server.ErrConfigNotLive))
	}
	next, err := readConfig(path, d.log)
	if err != nil {
		return res, d.reloadFailed(fmt.Errorf("%w: %s:\n%w", server.ErrConfigInvalid, path, err))
	}
	old := d.current.Load()
	changes, refused := diffConfig(old, next)
	if len(refused) > 0 {
		return res, d.reloadFailed(fmt.Errorf("%w (the configuration in force stays):\n%s", server.ErrConfigNotLive, strings.Join(refused, "\n")))
	}
	if err := d.apply(ctx, old, next); err != nil {
		return res, d.reloadFailed(err)
	}
	d.metrics.reloadSucceeded()
	for _, c := range changes {
		d.log.Info("config reloaded: " + c)
	}
	d.log.Info("configuration reloaded", "file", path, "changes", len(changes))
	res.Changes = changes
	if err := d.ReopenAuditLog(); err != nil {
		res.Changes = append(res.Changes, err.Error())
	}
	return res, nil
}

// readConfig reads, validates and checks the secrets of a configuration
// file, as start-up does.
func readConfig(path string, log *slog.Logger) (*config.Config, error) {
	f, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	cfg, err := f.Validate()
	if err != nil {
		return nil, err
	}
	warnings, err := rootcred.Check(cfg)
	for _, w := range append(cfg.Warnings, warnings...) {
		log.Warn("config: " + w)
	}
	if err != nil {
		return nil, err
	}
	return cfg, nil
}

// reloadFailed logs err line by line (each names its key), counts it and
// shows it in /readyz; it returns err.
func (d *Daemon) reloadFailed(err error) error {
	for _, line := range strings.Split(err.Error(), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			d.log.Error("config reload refused: " + line)
		}
	}
	d.metrics.reloadFailed(time.Now(), err)
	return err
}

// apply checks what only the running broker can check (proxy roles on
// their targets, a password at its new source) and then swaps every live
// setting in. A check that fails changes nothing.
func (d *Daemon) apply(ctx context.Context, old, next *config.Config) error {
	pol, err := newPolicy(next.Security)
	if err != nil {
		return fmt.Errorf("%w: %w", server.ErrConfigInvalid, err)
	}
	var errs []error
	for i, r := range next.Roles {
		if prev, ok := findRole(old.Roles, r.Name); ok && prev.Target == r.Target && prev.ProxyRole == r.ProxyRole {
			continue
		}
		if err := d.databases[r.Target].CheckProxyRole(ctx, r.ProxyRole); err != nil {
			errs = append(errs, fmt.Errorf("roles[%d].proxy_role: target %s: %w", i, r.Target, err))
		}
	}
	var sources []config.Target
	for i, t := range next.Targets {
		if samePasswordSource(old.Targets[i], t) {
			continue
		}
		if err := d.rootCreds.CheckSource(ctx, t); err != nil {
			errs = append(errs, fmt.Errorf("targets[%d] (%s): %w", i, t.Name, err))
		}
		sources = append(sources, t)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w:\n%w", server.ErrConfigInvalid, err)
	}
	bcfg := BrokerConfig(next)
	bcfg.Databases = d.databases
	if err := d.broker.Reconfigure(bcfg); err != nil {
		return fmt.Errorf("%w: %w", server.ErrConfigInvalid, err)
	}
	// Checked above; a source that changed again in between keeps the
	// old one, which is what an error here says.
	for _, t := range sources {
		if err := d.rootCreds.SetSource(ctx, t); err != nil {
			d.log.Error("config reload: admin password source not changed", "target", t.Name, "err", err)
		}
	}
	d.security.policy.p.Store(pol)
	d.security.quotas.Set(quotas(next.Security))
	if d.reload.level != nil {
		d.reload.level.Set(next.Log.Level)
	}
	d.current.Store(next)
	return nil
}

func findRole(roles []broker.Role, name string) (broker.Role, bool) {
	for _, r := range roles {
		if r.Name == name {
			return r, true
		}
	}
	return broker.Role{}, false
}

func samePasswordSource(a, b config.Target) bool {
	return a.PasswordFile == b.PasswordFile && a.PasswordEnv == b.PasswordEnv && reflect.DeepEqual(a.Vault, b.Vault)
}

// diffConfig compares the configuration in force with the one read: the
// changes that can apply live, and those that cannot (refused), each one
// line naming its key path. Secrets never appear: tokens are counted,
// password sources described by where they are.
func diffConfig(old, next *config.Config) (changes, refused []string) {
	restart := func(key string, a, b any) {
		refused = append(refused, fmt.Sprintf("%s: %v -> %v: cannot change while brokerd runs; restart brokerd to change it", key, a, b))
	}
	live := func(key string, a, b any) {
		changes = append(changes, fmt.Sprintf("%s: %v -> %v", key, a, b))
	}
	check := func(key string, a, b any, isLive bool) {
		if reflect.DeepEqual(a, b) {
			return
		}
		if isLive {
			live(key, a, b)
		} else {
			restart(key, a, b)
		}
	}
	check("listen", old.Listen, next.Listen, false)
	check("store.path", old.Store.Path, next.Store.Path, false)
	check("store.open_timeout", old.Store.OpenTimeout, next.Store.OpenTimeout, false)
	check("store.tombstone_retention", old.Store.TombstoneRetention, next.Store.TombstoneRetention, true)
	if !slices.Equal(old.TargetNames(), next.TargetNames()) {
		restart("targets", old.TargetNames(), next.TargetNames())
	} else {
		for i := range old.Targets {
			a, b := old.Targets[i], next.Targets[i]
			p := fmt.Sprintf("targets[%d]", i)
			check(p+".url", a.URL, b.URL, false)
			check(p+".marker_role", a.MarkerRole, b.MarkerRole, false)
			check(p+".max_conns", a.MaxConns, b.MaxConns, false)
			check(p+".scram_iterations", a.ScramIterations, b.ScramIterations, false)
			check(p+".connect_timeout", a.ConnectTimeout, b.ConnectTimeout, false)
			if !samePasswordSource(a, b) {
				if a.Vault != nil || b.Vault != nil {
					restart(p+".vault", a.PasswordSource, b.PasswordSource)
				} else {
					live(p+" password source", a.PasswordSource, b.PasswordSource)
				}
			}
		}
	}
	diffRoles(old, next, live)
	e, f := old.Expiry, next.Expiry
	check("expiry.revoke_concurrency", e.RevokeConcurrency, f.RevokeConcurrency, true)
	check("expiry.revoke_rate", e.RevokeRate, f.RevokeRate, true)
	check("expiry.revoke_retries", e.RevokeRetries, f.RevokeRetries, true)
	check("expiry.valid_until_grace", e.ValidUntilGrace, f.ValidUntilGrace, true)
	check("expiry.retry_base_delay", e.RetryBaseDelay, f.RetryBaseDelay, true)
	check("expiry.retry_max_delay", e.RetryMaxDelay, f.RetryMaxDelay, true)
	check("expiry.failed_retry_interval", e.FailedRetryInterval, f.FailedRetryInterval, true)
	check("reconcile_interval", old.ReconcileInterval, next.ReconcileInterval, true)
	check("disconnect_grace", old.DisconnectGrace, next.DisconnectGrace, true)
	check("shutdown_timeout", old.ShutdownTimeout, next.ShutdownTimeout, true)
	check("log.level", old.Log.Level, next.Log.Level, true)
	check("log.format", old.Log.Format, next.Log.Format, false)
	check("dsn_sslmode", old.DSNSSLMode, next.DSNSSLMode, false)
	s, t := old.Security, next.Security
	check("tls", s.TLS, t.TLS, false)
	if !reflect.DeepEqual(s.Tokens, t.Tokens) {
		if s.TLS != nil && (len(s.Tokens) > 0) != (len(t.Tokens) > 0) {
			// Whether a client certificate is required depends on it.
			restart("tokens (the first added or the last removed under tls)", len(s.Tokens), len(t.Tokens))
		} else {
			live("tokens", tokenIdentities(s.Tokens), tokenIdentities(t.Tokens))
		}
	}
	check("admins", s.Admins, t.Admins, true)
	check("quotas.max_active_per_identity", s.Quotas.IdentityMaxActive, t.Quotas.IdentityMaxActive, true)
	check("quotas.issue_rate_per_identity", s.Quotas.IssueRate, t.Quotas.IssueRate, true)
	check("quotas.issue_burst", s.Quotas.IssueBurst, t.Quotas.IssueBurst, true)
	check("audit.path", s.Audit.Path, t.Audit.Path, false)
	check("audit.hmac_key_file", s.Audit.HMACKeyFile, t.Audit.HMACKeyFile, false)
	check("audit.required", s.Audit.Required, t.Audit.Required, false)
	check("metrics", old.Metrics, next.Metrics, false)

	// A key this function does not name is not live: the safe default for
	// keys added later.
	if len(refused) == 0 && !reflect.DeepEqual(withoutLive(old), withoutLive(next)) {
		refused = append(refused, "a key that cannot change while brokerd runs changed; restart brokerd to change it")
	}
	return changes, refused
}

// diffRoles reports roles added, removed and changed, by name.
func diffRoles(old, next *config.Config, live func(key string, a, b any)) {
	for _, r := range old.Roles {
		if _, ok := findRole(next.Roles, r.Name); !ok {
			live(fmt.Sprintf("roles[%s]", r.Name), "present", "removed (its live leases keep their expiry)")
		}
	}
	for _, r := range next.Roles {
		p := fmt.Sprintf("roles[%s]", r.Name)
		prev, ok := findRole(old.Roles, r.Name)
		if !ok {
			live(p, "absent", fmt.Sprintf("added (target %s, proxy_role %s, default_ttl %s, max_ttl %s)", r.Target, r.ProxyRole, r.DefaultTTL, r.MaxTTL))
		} else {
			for _, f := range []struct {
				key  string
				a, b any
			}{
				{"target", prev.Target, r.Target},
				{"proxy_role", prev.ProxyRole, r.ProxyRole},
				{"default_ttl", prev.DefaultTTL, r.DefaultTTL},
				{"max_ttl", prev.MaxTTL, r.MaxTTL},
			} {
				if f.a != f.b {
					live(p+"."+f.key, f.a, f.b)
				}
			}
		}
		if a, b := old.Security.Allowed[r.Name], next.Security.Allowed[r.Name]; ok && !slices.Equal(a, b) || !ok && len(b) > 0 {
			live(p+".allowed", a, b)
		}
		if a, b := old.Security.Quotas.RoleMaxActive[r.Name], next.Security.Quotas.RoleMaxActive[r.Name]; a != b {
			live(p+".max_active_leases", a, b)
		}
	}
}

// withoutLive is cfg without the keys a reload applies, and without its
// warnings: what must be equal for a reload to go ahead.
func withoutLive(cfg *config.Config) config.Config {
	c := *cfg
	c.Roles, c.Expiry, c.Warnings = nil, config.Expiry{}, nil
	c.Store.TombstoneRetention = 0
	c.ReconcileInterval, c.DisconnectGrace, c.ShutdownTimeout = 0, 0, 0
	c.Log.Level = 0
	c.Security.Tokens, c.Security.Admins, c.Security.Allowed, c.Security.Quotas = nil, nil, nil, config.Quotas{}
	c.Targets = slices.Clone(c.Targets)
	for i := range c.Targets {
		if c.Targets[i].Vault == nil {
			c.Targets[i].PasswordFile, c.Targets[i].PasswordEnv, c.Targets[i].PasswordSource = "", "", ""
		}
	}
	return c
}

func tokenIdentities(tokens []config.Token) []string {
	ids := make([]string, 0, len(tokens))
	for _, t := range tokens {
		ids = append(ids, t.Identity)
	}
	sort.Strings(ids)
	return ids
}

// HandleHUP reloads the configuration each time sigs delivers a signal,
// until ctx ends, and reopens the audit log even when the reload fails;
// without a configuration file it only reopens the audit log. brokerd passes a channel notified of SIGHUP. A failed reload is
// logged and counted (see Reload) and changes nothing.
func (d *Daemon) HandleHUP(ctx context.Context, sigs <-chan os.Signal) {
	for {
		select {
		case <-sigs:
			if d.reload.path == "" {
				_ = d.ReopenAuditLog()
				continue
			}
			if _, err := d.Reload(ctx); err != nil {
				// logrotate's postrotate sends SIGHUP for the audit log
				// whatever state the configuration file is in.
				_ = d.ReopenAuditLog()
			}
		case <-ctx.Done():
			return
		}
	}
}
