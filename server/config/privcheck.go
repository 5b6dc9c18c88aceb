package config

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/store"
)

// DefaultStaleAfter is how long a broker role may go without an issued
// lease before the least-privilege check calls it stale.
const DefaultStaleAfter = 30 * 24 * time.Hour

// LeaseLister is where the stale check reads lease history: the store
// itself (brokerd, or brokerctl when no broker holds the file) or a running
// broker's ListLeases.
type LeaseLister interface {
	ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error)
}

// LastIssuedReader is a lease history that keeps each broker role's newest
// issue time itself (store.Store does), so the stale check reads one entry
// per role instead of every lease. Its memory is longer than the leases':
// a role's last issue stays known after the tombstone retention has
// dropped the lease, so the check judges such a role by its real last issue
// instead of calling it "no lease the store remembers".
type LastIssuedReader interface {
	// LastIssued maps each role that ever had a lease to the issue time
	// of its newest one; a role with none is absent.
	LastIssued(ctx context.Context) (map[string]time.Time, error)
}

var _ LastIssuedReader = (*store.Store)(nil)

// privilegeChecker is what the check needs of a target's engine.
type privilegeChecker interface {
	CheckPrivileges(ctx context.Context, uses []postgres.ProxyRoleUse) ([]postgres.Finding, error)
}

// PrivilegeCheck says what CheckPrivileges looks at besides the catalog.
type PrivilegeCheck struct {
	// Leases, if set, is read for the stale check; nil skips it. When it
	// is also a LastIssuedReader, that is all the check reads of it.
	Leases LeaseLister
	// StaleAfter: a broker role with no lease issued for this long is
	// stale; 0 is DefaultStaleAfter.
	StaleAfter time.Duration
	// Now is the current time; zero is time.Now().
	Now time.Time
}

// CheckPrivileges runs the least-privilege check (postgres.Engine's
// CheckPrivileges) on every target the runtime serves, plus the stale check
// over the runtime's store: for brokerd's start-up warnings.
func (rt *Runtime) CheckPrivileges(ctx context.Context, staleAfter time.Duration) ([]postgres.Finding, error) {
	var leases LeaseLister
	if rt.Store != nil {
		leases = rt.Store
	}
	return checkPrivileges(ctx, rt.Config, rt.Databases, PrivilegeCheck{Leases: leases, StaleAfter: staleAfter})
}

// CheckPrivileges connects to every target of cfg (without opening the
// store, which a running brokerd holds) and runs the least-privilege check
// there, plus the stale check over opts.Leases: for `brokerctl check`.
func CheckPrivileges(ctx context.Context, cfg *Config, logger *slog.Logger, opts PrivilegeCheck) ([]postgres.Finding, error) {
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
		return nil, err
	}
	return checkPrivileges(ctx, cfg, dbs, opts)
}

func checkPrivileges(ctx context.Context, cfg *Config, dbs map[string]broker.Database, opts PrivilegeCheck) ([]postgres.Finding, error) {
	var out []postgres.Finding
	var errs []error
	for _, t := range cfg.Targets {
		db, ok := dbs[t.Name].(privilegeChecker)
		if !ok {
			errs = append(errs, fmt.Errorf("target %s: its engine cannot check privileges", t.Name))
			continue
		}
		var uses []postgres.ProxyRoleUse
		for _, r := range cfg.Roles {
			if r.Target == t.Name {
				uses = append(uses, postgres.ProxyRoleUse{BrokerRole: r.Name, ProxyRole: r.ProxyRole})
			}
		}
		fs, err := db.CheckPrivileges(ctx, uses)
		if err != nil {
			errs = append(errs, fmt.Errorf("target %s: %w", t.Name, err))
			continue
		}
		for i := range fs {
			fs[i].Target = t.Name
		}
		out = append(out, fs...)
	}
	if opts.Leases != nil {
		stale, err := staleRoles(ctx, cfg, opts)
		if err != nil {
			errs = append(errs, fmt.Errorf("stale check: %w", err))
		}
		out = append(out, stale...)
	}
	postgres.SortFindings(out)
	return out, errors.Join(errs...)
}

// staleRoles reports the broker roles of cfg not issued for opts.StaleAfter,
// from each role's newest issue time (see lastIssued).
func staleRoles(ctx context.Context, cfg *Config, opts PrivilegeCheck) ([]postgres.Finding, error) {
	after := opts.StaleAfter
	if after <= 0 {
		after = DefaultStaleAfter
	}
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	last, err := lastIssued(ctx, opts.Leases)
	if err != nil {
		return nil, err
	}
	activity := make([]postgres.LeaseActivity, 0, len(cfg.Roles))
	target := map[string]string{}
	for _, r := range cfg.Roles {
		activity = append(activity, postgres.LeaseActivity{BrokerRole: r.Name, LastIssued: last[r.Name]})
		target[r.Name] = r.Target
	}
	fs := postgres.StaleRoles(activity, after, cfg.Store.TombstoneRetention, now)
	for i := range fs {
		fs[i].Target = target[fs[i].Role]
	}
	return fs, nil
}

// lastIssued returns the newest issue time of each role: from a
// LastIssuedReader when leases is one (the store, brokerd's own check),
// which costs one entry per role; else, for a running broker's ListLeases
// (brokerctl check while brokerd holds the store), by paging through every
// lease it holds, live ones and the tombstones of ended ones, which reads
// the whole store.
func lastIssued(ctx context.Context, leases LeaseLister) (map[string]time.Time, error) {
	if r, ok := leases.(LastIssuedReader); ok {
		return r.LastIssued(ctx)
	}
	last := map[string]time.Time{}
	for cursor := ""; ; {
		page, next, err := leases.ListLeases(ctx, broker.LeaseFilter{Limit: 1000, After: cursor})
		if err != nil {
			return nil, err
		}
		for _, l := range page {
			if l.IssueTime.After(last[l.Role]) {
				last[l.Role] = l.IssueTime
			}
		}
		if next == "" || len(page) == 0 {
			return last, nil
		}
		cursor = next
	}
}
