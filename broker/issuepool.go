package broker

import (
	"context"
	"math"
	"sync"
	"time"
)

// Reservations (the issue pool). Issuing a credential used to wait, before
// CREATE ROLE, on hashing its password (a millisecond of CPU) and on the
// fsynced commit of its intent. Neither depends on the request: the lease
// id, the username and the password are drawn at random. So the broker
// keeps a few reservations per role ready: each one an id, a username, a
// password and its verifier, whose intent is already durable. An issue
// takes one and goes straight to CREATE ROLE; the refill runs beside it,
// and writes its intents together (one group commit for several).
//
// Crash safety is unchanged: the intent is still written before its user
// can exist. A reserved intent is in flight (the reconciler leaves it
// alone) for as long as the broker holds the reservation; one left by a
// crash names a user that never existed, and settling it is a DROP ROLE IF
// EXISTS of nothing. Close deletes the intents of unused reservations.
// The password lives only in memory, as on the direct path.

// reservation is one issue made ready ahead of its request.
type reservation struct {
	intent   Intent
	password string
	verifier string // "" when the target's Database hashes in NewUser
}

type issuePool struct {
	mu        sync.Mutex
	ready     map[string][]reservation // by role name
	refilling map[string]bool
	rates     map[string]*issueRate // by role name
	stopped   bool
}

// The pool's size follows the role's issue rate. A refill round hashes
// the passwords it makes (about 0.7 ms of CPU each at 4,096 iterations)
// and writes their intents in one group commit; the reservations must
// last while it runs, or issues fall back to the direct path. Holding
// IssuePoolHorizon's worth of issues covers a round with room to spare
// (at 300 issues/s: 75 reservations, hashed in about 50 ms), and grows
// and shrinks with the load instead of a fixed count that was too small
// for 16 clients and idle for one. The floor keeps a few ready for an
// occasional issue; IssuePool bounds what a crash can leave behind (the
// intents of unused reservations, settled at the next start without a
// statement to PostgreSQL) and the work Close does.
const (
	IssuePoolHorizon = 250 * time.Millisecond
	IssuePoolFloor   = 4
	// issueRateWindow is how often the rate estimate is folded.
	issueRateWindow = time.Second
)

// issueRate estimates a role's issue rate: the issues counted in windows
// of issueRateWindow, each window's rate averaged with the estimate
// before it (a load that stops halves it every window), and the window
// under way raising it at once when it is already faster.
type issueRate struct {
	start  time.Time
	n      int
	perSec float64 // folded over the windows before this one
	est    float64 // what observe last returned
}

// observe counts one issue at now and returns the estimate.
func (r *issueRate) observe(now time.Time) float64 {
	if r.start.IsZero() {
		r.start = now
	}
	r.n++
	elapsed := now.Sub(r.start)
	switch {
	case elapsed >= issueRateWindow:
		inst := float64(r.n) / elapsed.Seconds()
		if r.perSec == 0 {
			r.perSec = inst
		} else {
			r.perSec = (r.perSec + inst) / 2
		}
		r.start, r.n = now, 0
		r.est = r.perSec
	case elapsed >= issueRateWindow/10:
		r.est = max(r.perSec, float64(r.n)/elapsed.Seconds())
	default:
		r.est = r.perSec
	}
	return r.est
}

// poolTarget is how many reservations a role with issue rate perSec
// keeps ready, for a pool bounded by limit (Config.IssuePool).
func poolTarget(perSec float64, limit int) int {
	n := int(math.Ceil(perSec * IssuePoolHorizon.Seconds()))
	return min(max(n, IssuePoolFloor), limit)
}

// takeReservation returns a ready reservation for role, if there is one,
// and starts a refill.
func (b *Broker) takeReservation(role Role) (reservation, bool) {
	if b.cfg.IssuePool <= 0 {
		return reservation{}, false
	}
	p := &b.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped || b.poolCtx == nil {
		return reservation{}, false
	}
	if p.rates == nil {
		p.rates = make(map[string]*issueRate)
	}
	rate := p.rates[role.Name]
	if rate == nil {
		rate = &issueRate{}
		p.rates[role.Name] = rate
	}
	rate.observe(b.clock.Now())
	var r reservation
	ok := false
	if list := p.ready[role.Name]; len(list) > 0 {
		r, ok = list[len(list)-1], true
		p.ready[role.Name] = list[:len(list)-1]
	}
	if !p.refilling[role.Name] {
		if p.refilling == nil {
			p.refilling = make(map[string]bool)
			p.ready = make(map[string][]reservation)
		}
		p.refilling[role.Name] = true
		b.wg.Add(1)
		go b.refill(b.poolCtx, role)
	}
	return r, ok
}

// refill tops role's reservations up to its target (poolTarget).
func (b *Broker) refill(ctx context.Context, role Role) {
	defer b.wg.Done()
	p := &b.pool
	for {
		p.mu.Lock()
		need := p.target(role.Name, b.cfg.IssuePool) - len(p.ready[role.Name])
		if need <= 0 || p.stopped || ctx.Err() != nil {
			p.refilling[role.Name] = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()

		made := b.reserve(ctx, role, need)
		p.mu.Lock()
		if p.stopped {
			p.mu.Unlock()
			b.release(made)
			return
		}
		p.ready[role.Name] = append(p.ready[role.Name], made...)
		if len(made) < need {
			// The store or the hash failed (logged): the next issue tries
			// again, and issues meanwhile take the direct path.
			p.refilling[role.Name] = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
	}
}

// reserve makes n reservations for role: passwords hashed one after the
// other, intents written at once so that they share commits.
func (b *Broker) reserve(ctx context.Context, role Role, n int) []reservation {
	db, err := b.db(role.Target)
	if err != nil {
		return nil
	}
	if b.ensureClaimed(ctx, role.Target) != nil {
		return nil // issues will say why
	}
	group, _ := b.groupID(ctx) // read by ensureClaimed
	hasher, _ := db.(PasswordHasher)
	now := b.wallNow()
	rs := make([]reservation, 0, n)
	for range n {
		r := reservation{
			intent: Intent{
				LeaseID:    newLeaseID(),
				Target:     role.Target,
				Username:   newUsername(role.Name),
				ProxyRole:  role.ProxyRole,
				CreateTime: now,
				Group:      group,
			},
			password: NewPassword(),
		}
		if hasher != nil {
			v, err := hasher.HashPassword(r.password)
			if err != nil {
				b.log.Warn("issue pool: hashing a password failed", "role", role.Name, "err", err)
				break
			}
			r.verifier = v
		}
		rs = append(rs, r)
	}
	ok := make([]bool, len(rs))
	var wg sync.WaitGroup
	for i := range rs {
		b.setInflight(rs[i].intent.LeaseID, true)
		wg.Go(func() {
			if err := b.store.PutIntent(ctx, rs[i].intent); err != nil {
				if ctx.Err() == nil {
					b.log.Warn("issue pool: recording an intent failed", "role", role.Name, "err", err)
				}
				return
			}
			ok[i] = true
		})
	}
	wg.Wait()
	out := rs[:0]
	for i, r := range rs {
		if ok[i] {
			out = append(out, r)
		} else {
			b.setInflight(r.intent.LeaseID, false)
		}
	}
	return out
}

// stopPool makes takeReservation return nothing and start no refill, and
// refills stop after their current round.
func (b *Broker) stopPool() {
	b.pool.mu.Lock()
	b.pool.stopped = true
	b.pool.mu.Unlock()
}

// drainPool deletes the intents of the reservations no issue took, once
// the refills are done (Close calls it after stopPool and waiting).
func (b *Broker) drainPool() {
	p := &b.pool
	p.mu.Lock()
	var left []reservation
	for _, list := range p.ready {
		left = append(left, list...)
	}
	p.ready = nil
	p.mu.Unlock()
	b.release(left)
}

// release deletes the intents of unused reservations. One that fails is
// settled by the next start's reconciliation.
func (b *Broker) release(rs []reservation) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, r := range rs {
		if err := b.store.DeleteIntent(ctx, r.intent.LeaseID); err != nil {
			b.log.Warn("issue pool: deleting an unused intent failed; the next start settles it",
				"lease_id", r.intent.LeaseID, "err", err)
		}
		b.setInflight(r.intent.LeaseID, false)
	}
}

// target is the role's pool size now (p.mu held).
func (p *issuePool) target(role string, limit int) int {
	var perSec float64
	if r := p.rates[role]; r != nil {
		perSec = r.est
	}
	return poolTarget(perSec, limit)
}
