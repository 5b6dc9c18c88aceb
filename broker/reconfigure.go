package broker

import (
	"fmt"

	"golang.org/x/time/rate"
)

// settings are what Reconfigure may change while the broker runs: the
// roles and the expiry, retry and retention settings. A snapshot is never
// changed once stored; Reconfigure stores a new one, so a call reads one
// consistent set of settings however a reload races it.
type settings struct {
	// cfg holds every field of Config with defaults filled in; of them,
	// only the ones Reconfigure documents are read from here.
	cfg   Config
	roles map[string]Role
}

// newSettings fills cfg's defaults and checks its roles against its
// databases.
func newSettings(cfg Config) (*settings, error) {
	setDefault(&cfg.ValidUntilGrace, DefaultValidUntilGrace)
	setDefault(&cfg.TombstoneRetention, DefaultTombstoneRetention)
	setDefault(&cfg.ReconcileInterval, DefaultReconcileInterval)
	setDefault(&cfg.RetryBaseDelay, DefaultRetryBaseDelay)
	setDefault(&cfg.RetryMaxDelay, DefaultRetryMaxDelay)
	setDefault(&cfg.FailedRetryInterval, DefaultFailedRetryInterval)
	setDefault(&cfg.DisconnectGrace, DefaultDisconnectGrace)
	if cfg.RevokeConcurrency <= 0 {
		cfg.RevokeConcurrency = DefaultRevokeConcurrency
	}
	if cfg.RevokeRate <= 0 {
		cfg.RevokeRate = DefaultRevokeRate
	}
	if cfg.RevokeRetries <= 0 {
		cfg.RevokeRetries = DefaultRevokeRetries
	}
	roles := make(map[string]Role, len(cfg.Roles))
	for _, r := range cfg.Roles {
		if err := ValidateRoleName(r.Name); err != nil {
			return nil, fmt.Errorf("broker: role %q: %w", r.Name, err)
		}
		if _, dup := roles[r.Name]; dup {
			return nil, fmt.Errorf("broker: role %q defined twice", r.Name)
		}
		if _, ok := cfg.Databases[r.Target]; !ok {
			return nil, fmt.Errorf("broker: role %q: unknown target %q", r.Name, r.Target)
		}
		if r.DefaultTTL <= 0 || r.MaxTTL <= 0 || r.DefaultTTL > r.MaxTTL {
			return nil, fmt.Errorf("broker: role %q: need 0 < default_ttl <= max_ttl", r.Name)
		}
		if r.RevokeUnusedAfter < 0 {
			return nil, fmt.Errorf("broker: role %q: revoke_unused_after must not be negative", r.Name)
		}
		roles[r.Name] = r
	}
	return &settings{cfg: cfg, roles: roles}, nil
}

// conf is the configuration in force: read the reloadable settings from
// it, once per decision.
func (b *Broker) conf() *Config { return &b.live.Load().cfg }

// role returns the role of that name in the configuration in force.
func (b *Broker) role(name string) (Role, bool) {
	r, ok := b.live.Load().roles[name]
	return r, ok
}

// Reconfigure replaces, while the broker runs, its roles (added, removed,
// TTLs changed) and the settings of expiry, revocation retries,
// reconciliation, retention and disconnects: ValidUntilGrace,
// TombstoneRetention, ReconcileInterval, RevokeConcurrency, RevokeRate,
// RevokeRetries, RetryBaseDelay, RetryMaxDelay, FailedRetryInterval and
// DisconnectGrace. Every other field of cfg is ignored: the store, the
// databases (a role must name one the broker was started with), the
// clock, the logger, the auditor, IssuePool and RenewBatches stay as New
// set them. An invalid cfg is an error and changes nothing.
//
// Calls that started before it finish with the settings they read; the
// next ones read the new settings. Leases are not touched: a lease of a
// removed role keeps its expiry (it holds what its revocation needs) and
// renews up to its own max_expire_time; a lease's expiry is not moved by a
// role's new TTLs. Reservations of the issue pool made for a removed or
// changed role are released.
func (b *Broker) Reconfigure(cfg Config) error {
	cfg.Store, cfg.Databases, cfg.Clock, cfg.Logger, cfg.Auditor = b.cfg.Store, b.cfg.Databases, b.cfg.Clock, b.cfg.Logger, b.cfg.Auditor
	cfg.IssuePool, cfg.RenewBatches = b.cfg.IssuePool, b.cfg.RenewBatches
	next, err := newSettings(cfg)
	if err != nil {
		return err
	}
	b.live.Store(next)
	b.limiter.SetLimit(rate.Limit(next.cfg.RevokeRate))
	b.limiter.SetBurst(next.cfg.RevokeConcurrency)
	b.releaseStaleReservations()
	return nil
}

// releaseStaleReservations releases the ready reservations whose role is
// gone or now names another target or proxy role.
func (b *Broker) releaseStaleReservations() {
	p := &b.pool
	p.mu.Lock()
	var stale []reservation
	for name, list := range p.ready {
		role, ok := b.role(name)
		keep := list[:0]
		for _, r := range list {
			if ok && r.intent.Target == role.Target && r.intent.ProxyRole == role.ProxyRole {
				keep = append(keep, r)
			} else {
				stale = append(stale, r)
			}
		}
		p.ready[name] = keep
	}
	p.mu.Unlock()
	if len(stale) > 0 {
		b.release(stale)
	}
}
