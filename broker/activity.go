package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// Database-side usage per lease. Every ActivityInterval the broker asks
// each target that implements ActivitySampler for the open sessions of
// the users it made, matches them to the live leases by username, and
// records on each lease what it saw (LeaseUsage): sessions now, the peak,
// how many distinct sessions, first and last seen, application_name and,
// when PostgreSQL shows them, the client address and the last query's
// start. Then a lease whose role has RevokeUnusedAfter and whose user has
// had no session for that long is revoked, with reason "unused".
//
// What sampling cannot see: a session that opens and closes between two
// samples. A client that connects for a few seconds every few minutes may
// look unused; RevokeUnusedAfter should be many intervals long.
//
// Writes: the changed leases of one sample are written in one
// UpdateLeases call (bbolt: one transaction), each under its lease lock
// taken with tryLock, so the sampler never waits behind a revocation or
// makes one conflict: a lease busy now is written at the next sample. A
// lease with no session and nothing new is not written; one with open
// sessions is, since its LastSeen moves.
//
// Under HA only the leader runs the sampling loop, as it runs expiry and
// reconciliation; what it writes is in the shared store, so every
// instance's Lookup and List show it.

// activityRevokeConcurrency bounds the unused-lease revocations one sample
// runs at once.
const activityRevokeConcurrency = 4

// ActivityReport is what one sample found, for metrics.
type ActivityReport struct {
	Time time.Time
	// Targets maps each target with an ActivitySampler to the error of
	// its sample (nil: sampled). A target that failed keeps its leases'
	// last known usage.
	Targets map[string]error
	// Roles aggregates the live leases by role.
	Roles map[string]RoleActivity
	// Written counts the leases whose usage was stored; Revoked those
	// revoked as unused.
	Written, Revoked int
}

// RoleActivity aggregates the live leases of one role.
type RoleActivity struct {
	// Leases counts the role's live leases; Sessions their open sessions
	// at their target's last sample.
	Leases, Sessions int
	// NeverUsed counts the live leases whose user was never seen
	// connected.
	NeverUsed int
}

// activityState is the sampler's memory between samples.
type activityState struct {
	mu     sync.Mutex // one sample at a time
	leases map[string]*leaseActivity

	watchMu  sync.Mutex
	watchers []func(ActivityReport)
}

// leaseActivity is what the sampler knows of one live lease.
type leaseActivity struct {
	role, target, username string
	issue                  time.Time
	state                  LeaseState
	// usage is the usage as stored.
	usage LeaseUsage
	// open holds the sessions seen at the last sample that was stored;
	// known is false until then (after a restart, or for a lease first
	// seen now), when only the stored count is known.
	open  map[sessionKey]bool
	known bool
}

// sessionKey tells sessions apart: a pid is reused only after its backend
// ended, and backend_start (when shown) separates even those.
type sessionKey struct {
	pid   int32
	start int64
}

// WatchActivity calls fn with the report of every sample, after its
// writes and revocations. fn must be quick.
func (b *Broker) WatchActivity(fn func(ActivityReport)) (stop func()) {
	a := &b.activity
	a.watchMu.Lock()
	defer a.watchMu.Unlock()
	a.watchers = append(a.watchers, fn)
	i := len(a.watchers) - 1
	var once sync.Once
	return func() {
		once.Do(func() {
			a.watchMu.Lock()
			defer a.watchMu.Unlock()
			a.watchers[i] = nil
		})
	}
}

// samplesActivity reports whether any target can report its sessions.
func (b *Broker) samplesActivity() bool {
	for _, db := range b.dbs {
		if _, ok := db.(ActivitySampler); ok {
			return true
		}
	}
	return false
}

// activityLoop samples every ActivityInterval until ctx ends.
func (b *Broker) activityLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.clock.After(b.cfg.ActivityInterval):
		}
		if _, err := b.SampleActivity(ctx); err != nil && ctx.Err() == nil {
			b.log.Warn("activity sample incomplete", "err", err)
		}
	}
}

// SampleActivity samples every target once, records what changed on the
// leases, revokes the unused ones and reports the result. brokerd calls
// it every activity.sample_interval; tests call it directly. A target
// whose sample fails is skipped (its error is in the report and the
// returned error); its leases are neither updated nor revoked as unused.
func (b *Broker) SampleActivity(ctx context.Context) (ActivityReport, error) {
	a := &b.activity
	a.mu.Lock()
	defer a.mu.Unlock()
	now := b.wallNow().UTC()
	rep := ActivityReport{Time: now, Targets: map[string]error{}, Roles: map[string]RoleActivity{}}
	var errs []error

	// 1. Sessions, per target and user.
	sessions := map[string]map[string][]Session{}
	for name, db := range b.dbs {
		s, ok := db.(ActivitySampler)
		if !ok {
			continue
		}
		list, err := s.SampleSessions(ctx)
		rep.Targets[name] = err
		if err != nil {
			errs = append(errs, fmt.Errorf("target %s: %w", name, err))
			continue
		}
		byUser := map[string][]Session{}
		for _, s := range list {
			byUser[s.Username] = append(byUser[s.Username], s)
		}
		sessions[name] = byUser
	}

	// 2. The live leases, from the expiry index.
	var live []ExpiryEntry
	if err := b.store.ScanExpiry(ctx, func(e ExpiryEntry) bool {
		live = append(live, e)
		return true
	}); err != nil {
		return rep, errors.Join(append(errs, fmt.Errorf("scan live leases: %w", err))...)
	}
	if a.leases == nil {
		a.leases = map[string]*leaseActivity{}
	}
	seen := make(map[string]bool, len(live))
	for _, e := range live {
		seen[e.LeaseID] = true
		la := a.leases[e.LeaseID]
		if la == nil || e.Username == "" {
			l, err := b.store.GetLease(ctx, e.LeaseID)
			if errors.Is(err, ErrLeaseNotFound) {
				delete(seen, e.LeaseID)
				continue
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("read lease %s: %w", e.LeaseID, err))
				delete(seen, e.LeaseID)
				continue
			}
			if la == nil {
				la = &leaseActivity{role: l.Role, issue: l.IssueTime, usage: l.Usage}
				a.leases[e.LeaseID] = la
			}
			e.Target, e.Username, e.State = l.Target, l.Username, l.State
		}
		la.target, la.username, la.state = e.Target, e.Username, e.State
	}
	for id := range a.leases {
		if !seen[id] {
			delete(a.leases, id)
		}
	}

	// 3. What changed, and what is unused.
	type change struct {
		id    string
		usage LeaseUsage
		open  map[sessionKey]bool
	}
	var changes []change
	var unused []string
	for id, la := range a.leases {
		byUser, sampled := sessions[la.target]
		if !sampled {
			continue
		}
		u, open := nextUsage(la, byUser[la.username], now)
		if !sameUsage(u, la.usage) {
			changes = append(changes, change{id, u, open})
		} else {
			la.open, la.known = open, true
		}
		if la.state.Usable() && b.unusedFor(la.role, la.issue, u, now) {
			unused = append(unused, id)
		}
	}

	// 4. Store the changes in one batch.
	if len(changes) > 0 {
		slices.SortFunc(changes, func(x, y change) int { return strings.Compare(x.id, y.id) })
		var batch []Lease
		var batched []change
		var unlocks []func()
		for _, c := range changes {
			unlock, ok := b.leaseMu.tryLock(c.id)
			if !ok {
				continue // busy: the next sample writes it
			}
			unlocks = append(unlocks, unlock)
			l, err := b.store.GetLease(ctx, c.id)
			if err != nil || !l.State.Live() {
				if err != nil && !errors.Is(err, ErrLeaseNotFound) {
					errs = append(errs, fmt.Errorf("read lease %s: %w", c.id, err))
				}
				continue
			}
			if la := a.leases[c.id]; !sameUsage(l.Usage, la.usage) {
				// Another instance sampled it meanwhile (a leadership
				// change): start again from what is stored.
				la.usage, la.known = l.Usage, false
				continue
			}
			l.Usage = c.usage
			batch = append(batch, l)
			batched = append(batched, c)
		}
		var stored []Lease
		var werrs []error
		if len(batch) > 0 {
			stored, werrs = b.store.UpdateLeases(ctx, batch)
		}
		for _, u := range unlocks {
			u()
		}
		for i, c := range batched {
			if werrs[i] != nil {
				errs = append(errs, fmt.Errorf("store usage of lease %s: %w", c.id, werrs[i]))
				continue
			}
			rep.Written++
			la := a.leases[c.id]
			first := !la.usage.Used() && c.usage.Used()
			la.usage, la.open, la.known = c.usage, c.open, true
			if first {
				b.audit(AuditFirstUse, stored[i], "")
			}
		}
	}

	// 5. Revoke the unused leases.
	if len(unused) > 0 {
		slices.Sort(unused)
		// Judged again on the stored lease, which the writes above
		// brought up to date: one written elsewhere, or not written now
		// (busy), is left for the next sample.
		unused = slices.DeleteFunc(unused, func(id string) bool {
			l, err := b.store.GetLease(ctx, id)
			return err != nil || !l.State.Usable() || !b.unusedFor(l.Role, l.IssueTime, l.Usage, now)
		})
		n, err := b.revokeEach(ctx, unused, causeUnused, activityRevokeConcurrency)
		rep.Revoked = n
		if err != nil {
			errs = append(errs, fmt.Errorf("revoke unused leases: %w", err))
		}
		// The ended ones are no longer live: out of the aggregates.
		for _, id := range unused {
			if l, err := b.store.GetLease(ctx, id); err == nil && l.State.Terminal() || errors.Is(err, ErrLeaseNotFound) {
				delete(a.leases, id)
			}
		}
	}

	// 6. Aggregate per role, over what is known of every live lease.
	for _, la := range a.leases {
		r := rep.Roles[la.role]
		r.Leases++
		r.Sessions += la.usage.Sessions
		if !la.usage.Used() {
			r.NeverUsed++
		}
		rep.Roles[la.role] = r
	}
	a.watchMu.Lock()
	watchers := slices.Clone(a.watchers)
	a.watchMu.Unlock()
	for _, fn := range watchers {
		if fn != nil {
			fn(rep)
		}
	}
	return rep, errors.Join(errs...)
}

// unusedFor reports whether a lease of role, issued at issue, with usage
// u (after a sample at now) is to be revoked as unused: its role has
// RevokeUnusedAfter, and its user has had no session for that long since
// it was issued or last seen.
func (b *Broker) unusedFor(role string, issue time.Time, u LeaseUsage, now time.Time) bool {
	r, ok := b.role(role)
	if !ok || r.RevokeUnusedAfter <= 0 || u.Sessions > 0 {
		return false
	}
	idle := issue
	if u.Used() {
		idle = u.LastSeen
	}
	return !now.Before(idle.Add(r.RevokeUnusedAfter))
}

// sameUsage compares usages, instants by Equal.
func sameUsage(x, y LeaseUsage) bool {
	return x.Sessions == y.Sessions && x.PeakSessions == y.PeakSessions && x.SessionsSeen == y.SessionsSeen &&
		x.FirstSeen.Equal(y.FirstSeen) && x.LastSeen.Equal(y.LastSeen) && x.LastQueryStart.Equal(y.LastQueryStart) &&
		x.ApplicationName == y.ApplicationName && x.ClientAddr == y.ClientAddr
}

// nextUsage is la's usage after a sample at now found sessions of its
// user, and the set of those sessions.
func nextUsage(la *leaseActivity, sessions []Session, now time.Time) (LeaseUsage, map[sessionKey]bool) {
	u := la.usage
	u.Sessions = len(sessions)
	open := make(map[sessionKey]bool, len(sessions))
	fresh := 0
	var newest *Session
	for i := range sessions {
		s := &sessions[i]
		k := sessionKeyOf(s)
		open[k] = true
		if la.known && !la.open[k] {
			fresh++
		}
		if newest == nil || newer(s, newest, la.open) {
			newest = s
		}
		if q := s.QueryStart; q.After(u.LastQueryStart) {
			u.LastQueryStart = q.UTC()
		}
	}
	if !la.known {
		// After a restart the sessions the stored usage counted are
		// unknown: count only those beyond its open count.
		fresh = max(0, len(sessions)-la.usage.Sessions)
	}
	if len(sessions) == 0 {
		return u, open
	}
	if u.FirstSeen.IsZero() {
		u.FirstSeen = now
	}
	u.LastSeen = now
	u.PeakSessions = max(u.PeakSessions, len(sessions))
	u.SessionsSeen += fresh
	u.ApplicationName = newest.ApplicationName
	if newest.ClientAddr != "" {
		u.ClientAddr = newest.ClientAddr
	}
	return u, open
}

// newer reports whether s looks newer than t: a later backend_start;
// without one (PostgreSQL hides it without pg_read_all_stats), a session
// not open at the last sample over one that was, then the larger pid.
func newer(s, t *Session, open map[sessionKey]bool) bool {
	if !s.BackendStart.Equal(t.BackendStart) {
		return s.BackendStart.After(t.BackendStart)
	}
	if sNew, tNew := !open[sessionKeyOf(s)], !open[sessionKeyOf(t)]; sNew != tNew {
		return sNew
	}
	return s.PID > t.PID
}

func sessionKeyOf(s *Session) sessionKey {
	k := sessionKey{pid: s.PID}
	if !s.BackendStart.IsZero() {
		k.start = s.BackendStart.UnixNano()
	}
	return k
}
