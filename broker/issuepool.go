package broker

import (
	"context"
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
	stopped   bool
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

// refill tops role's reservations up to Config.IssuePool.
func (b *Broker) refill(ctx context.Context, role Role) {
	defer b.wg.Done()
	p := &b.pool
	for {
		p.mu.Lock()
		need := b.cfg.IssuePool - len(p.ready[role.Name])
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
