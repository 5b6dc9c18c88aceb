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
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server/config"
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
// issue time itself (the bbolt store does), so the stale check reads one entry
// per role instead of every lease. Its memory is longer than the leases':
// a role's last issue stays known after the tombstone retention has
// dropped the lease, so the check judges such a role by its real last issue
// instead of calling it "no lease the store remembers".
type LastIssuedReader interface {
	// LastIssued maps each role that ever had a lease to the issue time
	// of its newest one; a role with none is absent.
	LastIssued(ctx context.Context) (map[string]time.Time, error)
}

// Checker is what the check needs of a target's engine.
type Checker interface {
	CheckPrivileges(ctx context.Context, uses []postgres.ProxyRoleUse) ([]postgres.Finding, error)
}

// Options say what Run looks at besides the catalog.
type Options struct {
	// Leases, if set, is read for the stale check; nil skips it. When it
	// is also a LastIssuedReader, that is all the check reads of it.
	Leases LeaseLister
	// StaleAfter: a broker role with no lease issued for this long is
	// stale; 0 is DefaultStaleAfter.
	StaleAfter time.Duration
	// Now is the current time; zero is time.Now().
	Now time.Time
}

// Run runs the least-privilege check on every target of cfg, through
// engines (the target name's engine, which must implement Checker), plus
// the stale check over opts.Leases. It returns what it found, most severe
// first, and an error joining every part that could not run.
func Run(ctx context.Context, cfg *config.Config, engines map[string]broker.Database, opts Options) ([]postgres.Finding, error) {
	return checkPrivileges(ctx, cfg, engines, opts)
}

func checkPrivileges(ctx context.Context, cfg *config.Config, dbs map[string]broker.Database, opts Options) ([]postgres.Finding, error) {
	var out []postgres.Finding
	var errs []error
	for _, t := range cfg.Targets {
		db, ok := dbs[t.Name].(Checker)
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
func staleRoles(ctx context.Context, cfg *config.Config, opts Options) ([]postgres.Finding, error) {
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

// LogFindings logs findings as brokerd does at start-up: medium and above
// as warnings, the rest as information, each with its fix. err, from Run,
// is logged as an incomplete check. Findings never stop brokerd: a DBA
// may have reasons, and the broker still only hands out its proxy roles.
func LogFindings(ctx context.Context, log *slog.Logger, findings []postgres.Finding, err error) {
	if err != nil {
		log.Warn("least-privilege check incomplete", "err", err)
	}
	for _, f := range findings {
		level := slog.LevelWarn
		if f.Severity < postgres.SeverityMedium {
			level = slog.LevelInfo
		}
		attrs := []any{"severity", f.Severity.String(), "check", f.Check, "target", f.Target, "role", f.Role}
		if f.Fix != "" {
			attrs = append(attrs, "fix", f.Fix)
		}
		log.Log(ctx, level, "least privilege: "+f.Message, attrs...)
	}
}
