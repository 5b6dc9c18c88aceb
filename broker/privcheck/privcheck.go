// Package privcheck is the least-privilege check of the article the
// project grew from, made a command: it asks every target's engine which
// of the proxy roles (and the broker's own admin role) hold more than
// they should — superuser, CREATEROLE, BYPASSRLS, GRANT ALL, overlapping
// roles — and reads the lease history for broker roles nobody uses. It
// serves `brokerctl check` and the findings brokerd logs at start-up.
// The catalog queries themselves are the engine's (broker/postgres).
package privcheck

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/credbroker/credbroker/broker"
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

// Checker is what the check needs of a target's engine.
type Checker interface {
	CheckPrivileges(ctx context.Context, uses []ProxyRoleUse) ([]Finding, error)
}

// Options say what Run looks at besides the catalog.
type Options struct {
	// Leases, if set, is read for the stale check; nil skips it. When it
	// is also a broker.LastIssuedReader, that is all the check reads of it.
	Leases LeaseLister
	// StaleAfter: a broker role with no lease issued for this long is
	// stale; 0 is DefaultStaleAfter.
	StaleAfter time.Duration
	// Retention is the store's tombstone retention: a role with no lease
	// in the store is only called unused when the store would remember
	// one (see StaleRoles).
	Retention time.Duration
	// Now is the current time; zero is time.Now().
	Now time.Time
}

// Scope is what the check covers: the targets (in the configuration's
// order), the broker roles on them, and each target's engine, which must
// implement Checker.
type Scope struct {
	Targets []string
	Roles   []broker.Role
	Engines map[string]broker.Database
}

// Run runs the least-privilege check on every target of the scope, plus
// the stale check over opts.Leases. It returns what it found, most severe
// first, and an error joining every part that could not run.
func Run(ctx context.Context, scope Scope, opts Options) ([]Finding, error) {
	var out []Finding
	var errs []error
	for _, name := range scope.Targets {
		db, ok := scope.Engines[name].(Checker)
		if !ok {
			errs = append(errs, fmt.Errorf("target %s: its engine cannot check privileges", name))
			continue
		}
		var uses []ProxyRoleUse
		for _, r := range scope.Roles {
			if r.Target == name {
				uses = append(uses, ProxyRoleUse{BrokerRole: r.Name, ProxyRole: r.ProxyRole})
			}
		}
		fs, err := db.CheckPrivileges(ctx, uses)
		if err != nil {
			errs = append(errs, fmt.Errorf("target %s: %w", name, err))
			continue
		}
		for i := range fs {
			fs[i].Target = name
		}
		out = append(out, fs...)
	}
	if opts.Leases != nil {
		stale, err := staleRoles(ctx, scope.Roles, opts)
		if err != nil {
			errs = append(errs, fmt.Errorf("stale check: %w", err))
		}
		out = append(out, stale...)
	}
	SortFindings(out)
	return out, errors.Join(errs...)
}

// staleRoles reports the broker roles not issued for opts.StaleAfter, from
// each role's newest issue time (see lastIssued).
func staleRoles(ctx context.Context, roles []broker.Role, opts Options) ([]Finding, error) {
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
	activity := make([]LeaseActivity, 0, len(roles))
	target := map[string]string{}
	for _, r := range roles {
		activity = append(activity, LeaseActivity{BrokerRole: r.Name, LastIssued: last[r.Name]})
		target[r.Name] = r.Target
	}
	fs := StaleRoles(activity, after, opts.Retention, now)
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
	if r, ok := leases.(broker.LastIssuedReader); ok {
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

// LogFindings logs findings as brokerd does at start-up: medium and above
// as warnings, the rest as information, each with its fix. err, from Run,
// is logged as an incomplete check. Findings never stop brokerd: a DBA
// may have reasons, and the broker still only hands out its proxy roles.
func LogFindings(ctx context.Context, log *slog.Logger, findings []Finding, err error) {
	if err != nil {
		log.Warn("least-privilege check incomplete", "err", err)
	}
	for _, f := range findings {
		level := slog.LevelWarn
		if f.Severity < SeverityMedium {
			level = slog.LevelInfo
		}
		attrs := []any{"severity", f.Severity.String(), "check", f.Check, "target", f.Target, "role", f.Role}
		if f.Fix != "" {
			attrs = append(attrs, "fix", f.Fix)
		}
		log.Log(ctx, level, "least privilege: "+f.Message, attrs...)
	}
}
