package server

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
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

// LiveQuotas holds the quotas in force, which Set replaces while the
// server runs (a configuration reload): each issue reads them once.
type LiveQuotas struct{ p atomic.Pointer[Quotas] }

// NewLiveQuotas returns LiveQuotas holding q.
func NewLiveQuotas(q Quotas) *LiveQuotas {
	l := &LiveQuotas{}
	l.Set(q)
	return l
}

// Set makes q the quotas in force for the next issue. An identity's rate
// limiter keeps its tokens and takes the new rate and burst.
func (l *LiveQuotas) Set(q Quotas) {
	if q.IssueBurst <= 0 {
		q.IssueBurst = 1
	}
	l.p.Store(&q)
}

// Get returns the quotas in force.
func (l *LiveQuotas) Get() Quotas { return *l.p.Load() }

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
	quotas *LiveQuotas
	active *activeLeases // nil when no max_active_* quota is set

	checkMu sync.Mutex
	mu      sync.Mutex
	pending map[string]int // "r/"+role and "i/"+identity of issues in flight

	limitersMu sync.Mutex
	limiters   map[string]*rate.Limiter
}

// newQuotaKeeper enforces live, or q when live is nil.
func newQuotaKeeper(q Quotas, live *LiveQuotas, b *broker.Broker) *quotaKeeper {
	reloadable := live != nil
	if !reloadable {
		live = NewLiveQuotas(q)
	}
	q = live.Get()
	k := &quotaKeeper{quotas: live, pending: map[string]int{}, limiters: map[string]*rate.Limiter{}}
	// With live quotas a reload may set a max_active_* quota later, so
	// the counts are kept ready (they read the store only once one is set).
	if b != nil && (q.IdentityMaxActive > 0 || len(q.RoleMaxActive) > 0 || reloadable) {
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
	q := k.quotas.Get()
	lim := k.limiter(q, identity)
	// Cheap refusal first: no count for a caller over its rate.
	if err := k.rateAvailable(q, identity, lim); err != nil {
		return nil, err
	}
	roleMax := q.RoleMaxActive[role]
	idMax := q.IdentityMaxActive
	if k.active == nil || (roleMax <= 0 && idMax <= 0) {
		if err := k.takeRate(q, identity, lim); err != nil {
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
	if err := k.takeRate(q, identity, lim); err != nil {
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
func (k *quotaKeeper) limiter(q Quotas, identity string) *rate.Limiter {
	if q.IssueRate <= 0 {
		return nil
	}
	k.limitersMu.Lock()
	defer k.limitersMu.Unlock()
	lim, ok := k.limiters[identity]
	if !ok {
		if len(k.limiters) >= maxLimiters {
			now := time.Now()
			for name, l := range k.limiters {
				if l.TokensAt(now) >= float64(q.IssueBurst) {
					delete(k.limiters, name)
				}
			}
		}
		lim = rate.NewLimiter(rate.Limit(q.IssueRate), q.IssueBurst)
		k.limiters[identity] = lim
	} else if lim.Limit() != rate.Limit(q.IssueRate) || lim.Burst() != q.IssueBurst {
		// A reload changed the rate: the limiter keeps its tokens.
		lim.SetLimit(rate.Limit(q.IssueRate))
		lim.SetBurst(q.IssueBurst)
	}
	return lim
}

// rateAvailable refuses the call if lim has no token now, without taking one.
func (k *quotaKeeper) rateAvailable(q Quotas, identity string, lim *rate.Limiter) error {
	if lim == nil {
		return nil
	}
	if tokens := lim.TokensAt(time.Now()); tokens < 1 {
		wait := time.Duration((1 - tokens) / q.IssueRate * float64(time.Second))
		return rateError(q, identity, wait)
	}
	return nil
}

// takeRate takes one token from lim, or refuses the call without taking
// one (a concurrent call may have taken the last since rateAvailable).
func (k *quotaKeeper) takeRate(q Quotas, identity string, lim *rate.Limiter) error {
	if lim == nil {
		return nil
	}
	r := lim.Reserve()
	if d := r.Delay(); d > 0 {
		// The reservation's time has not come, so Cancel gives its
		// token back.
		r.Cancel()
		return rateError(q, identity, d)
	}
	return nil
}

func rateError(q Quotas, identity string, wait time.Duration) error {
	return fmt.Errorf("rate limit: identity %q may issue %s credential(s) per second (burst %d) (quotas.issue_rate_per_identity); try again in %s: %w",
		identity, formatRate(q.IssueRate), q.IssueBurst, wait.Round(time.Millisecond), broker.ErrResourceExhausted)
}

func formatRate(r float64) string { return fmt.Sprintf("%.4g", r) }
