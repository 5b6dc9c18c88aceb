package server

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/credbroker/credbroker/broker"
)

// Quotas bound what callers can make the broker create. Zero fields are
// unlimited. Exceeding one answers ResourceExhausted.
//
// They exist for the crash-looping service: one that issues a credential
// at every start and never revokes it can otherwise fill PostgreSQL with
// thousands of users over a weekend (vault#5475).
type Quotas struct {
	// RoleMaxActive caps the active leases of each role (by role name).
	RoleMaxActive map[string]int
	// IdentityMaxActive caps the active leases of each identity.
	IdentityMaxActive int
	// IssueRate is the sustained issues per second allowed to each
	// identity, with bursts of IssueBurst (default 1).
	IssueRate  float64
	IssueBurst int
}

// quotaKeeper enforces Quotas in front of broker.Issue.
//
// Active leases are counted by activeLeases: read from the store once, so
// the count is right after a restart, then kept from the broker's lifecycle
// events, whatever ended the leases (expiry, an admin, reconciliation). An
// issue costs a map lookup, not a scan of the store. The check and the
// reservation of the new lease happen under one mutex; an issue in flight
// stays reserved until its lease is counted, after which it is briefly
// counted twice, which errs on the side of refusing.
type quotaKeeper struct {
	q      Quotas
	active *activeLeases // nil when no max_active_* quota is set

	checkMu sync.Mutex
	mu      sync.Mutex
	pending map[string]int // "r/"+role and "i/"+identity of issues in flight

	limitersMu sync.Mutex
	limiters   map[string]*rate.Limiter
}

func newQuotaKeeper(q Quotas, b *broker.Broker) *quotaKeeper {
	if q.IssueBurst <= 0 {
		q.IssueBurst = 1
	}
	k := &quotaKeeper{q: q, pending: map[string]int{}, limiters: map[string]*rate.Limiter{}}
	if b != nil && (q.IdentityMaxActive > 0 || len(q.RoleMaxActive) > 0) {
		k.active = newActiveLeases(b)
	}
	return k
}

// maxLimiters bounds the per-identity limiters kept. Identities are
// authenticated, so there are few; the bound is for safety, and limiters
// that have refilled carry no state worth keeping.
const maxLimiters = 10000

// admit checks the rate limit and the active-lease quotas for one issue.
// On success the caller must call release once the issue has finished,
// successfully or not.
//
// The rate limit's token is taken last, once every other quota has let the
// call through: a call refused for an active-lease quota does not use up
// the caller's allowance (a reservation taken and then cancelled would not
// give it back: golang.org/x/time/rate restores only reservations whose
// time has not come).
func (k *quotaKeeper) admit(ctx context.Context, identity, role string) (release func(), err error) {
	lim := k.limiter(identity)
	// Cheap refusal first: no count for a caller over its rate.
	if err := k.rateAvailable(identity, lim); err != nil {
		return nil, err
	}
	roleMax := k.q.RoleMaxActive[role]
	idMax := k.q.IdentityMaxActive
	if k.active == nil || (roleMax <= 0 && idMax <= 0) {
		if err := k.takeRate(identity, lim); err != nil {
			return nil, err
		}
		return func() {}, nil
	}
	k.checkMu.Lock()
	defer k.checkMu.Unlock()
	roleN, idN, err := k.active.counts(ctx, role, identity)
	if err != nil {
		return nil, err
	}
	rk, ik := "r/"+role, "i/"+identity
	k.mu.Lock()
	roleN += k.pending[rk]
	idN += k.pending[ik]
	k.mu.Unlock()
	switch {
	case idMax > 0 && idN >= idMax:
		return nil, fmt.Errorf("quota: identity %q already holds %d active leases, the maximum (quotas.max_active_per_identity) is %d; revoke leases it no longer uses: %w",
			identity, idN, idMax, broker.ErrResourceExhausted)
	case roleMax > 0 && roleN >= roleMax:
		return nil, fmt.Errorf("quota: role %q already has %d active leases, the maximum (roles[].max_active_leases) is %d: %w",
			role, roleN, roleMax, broker.ErrResourceExhausted)
	}
	if err := k.takeRate(identity, lim); err != nil {
		return nil, err
	}
	k.mu.Lock()
	k.pending[rk]++
	k.pending[ik]++
	k.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			k.mu.Lock()
			defer k.mu.Unlock()
			for _, key := range []string{rk, ik} {
				if k.pending[key]--; k.pending[key] <= 0 {
					delete(k.pending, key)
				}
			}
		})
	}, nil
}

// limiter returns identity's rate limiter, nil without a rate limit.
func (k *quotaKeeper) limiter(identity string) *rate.Limiter {
	if k.q.IssueRate <= 0 {
		return nil
	}
	k.limitersMu.Lock()
	defer k.limitersMu.Unlock()
	lim, ok := k.limiters[identity]
	if !ok {
		if len(k.limiters) >= maxLimiters {
			now := time.Now()
			for name, l := range k.limiters {
				if l.TokensAt(now) >= float64(k.q.IssueBurst) {
					delete(k.limiters, name)
				}
			}
		}
		lim = rate.NewLimiter(rate.Limit(k.q.IssueRate), k.q.IssueBurst)
		k.limiters[identity] = lim
	}
	return lim
}

// rateAvailable refuses the call if lim has no token now, without taking one.
func (k *quotaKeeper) rateAvailable(identity string, lim *rate.Limiter) error {
	if lim == nil {
		return nil
	}
	if tokens := lim.TokensAt(time.Now()); tokens < 1 {
		wait := time.Duration((1 - tokens) / k.q.IssueRate * float64(time.Second))
		return k.rateError(identity, wait)
	}
	return nil
}

// takeRate takes one token from lim, or refuses the call without taking
// one (a concurrent call may have taken the last since rateAvailable).
func (k *quotaKeeper) takeRate(identity string, lim *rate.Limiter) error {
	if lim == nil {
		return nil
	}
	r := lim.Reserve()
	if d := r.Delay(); d > 0 {
		// The reservation's time has not come, so Cancel gives its
		// token back.
		r.Cancel()
		return k.rateError(identity, d)
	}
	return nil
}

func (k *quotaKeeper) rateError(identity string, wait time.Duration) error {
	return fmt.Errorf("rate limit: identity %q may issue %s credential(s) per second (burst %d) (quotas.issue_rate_per_identity); try again in %s: %w",
		identity, formatRate(k.q.IssueRate), k.q.IssueBurst, wait.Round(time.Millisecond), broker.ErrResourceExhausted)
}

func formatRate(r float64) string { return fmt.Sprintf("%.4g", r) }
