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
// Active leases are counted from the store, so the count is right after a
// restart and whatever ended the leases (expiry, an admin, reconciliation).
// The count and the reservation of the new lease happen under one mutex;
// an issue in flight stays reserved until its lease is in the store, after
// which it may briefly be counted twice, which errs on the side of refusing.
type quotaKeeper struct {
	q Quotas

	checkMu sync.Mutex
	mu      sync.Mutex
	pending map[string]int // "r/"+role and "i/"+identity of issues in flight

	limitersMu sync.Mutex
	limiters   map[string]*rate.Limiter
}

func newQuotaKeeper(q Quotas) *quotaKeeper {
	if q.IssueBurst <= 0 {
		q.IssueBurst = 1
	}
	return &quotaKeeper{q: q, pending: map[string]int{}, limiters: map[string]*rate.Limiter{}}
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
func (k *quotaKeeper) admit(ctx context.Context, b *broker.Broker, identity, role string) (release func(), err error) {
	lim := k.limiter(identity)
	// Cheap refusal first: no count for a caller over its rate.
	if err := k.rateAvailable(identity, lim); err != nil {
		return nil, err
	}
	roleMax := k.q.RoleMaxActive[role]
	idMax := k.q.IdentityMaxActive
	if roleMax <= 0 && idMax <= 0 {
		if err := k.takeRate(identity, lim); err != nil {
			return nil, err
		}
		return func() {}, nil
	}
	k.checkMu.Lock()
	defer k.checkMu.Unlock()
	roleN, idN, err := countActive(ctx, b, role, identity)
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

// countActive counts the active leases of role and of identity in one
// pass over the store.
func countActive(ctx context.Context, b *broker.Broker, role, identity string) (roleN, idN int, err error) {
	f := broker.LeaseFilter{State: broker.StateActive, Limit: 1000}
	for {
		page, next, err := b.ListLeases(ctx, f)
		if err != nil {
			return 0, 0, err
		}
		for i := range page {
			if page[i].Role == role {
				roleN++
			}
			if page[i].Client == identity {
				idN++
			}
		}
		if next == "" {
			return roleN, idN, nil
		}
		f.After = next
	}
}
