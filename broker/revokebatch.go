package broker

import (
	"context"
	"errors"
	"slices"
	"time"
)

// Revocation batching. An admin revoking many leases, or many owners
// revoking theirs at once (services shutting down together), would each
// run DeleteUser's whole sequence: two PostgreSQL commits and two store
// commits per lease. Revocations of one target that arrive together are
// run together instead, as the expiry manager's are (revokeBatch): one
// store transaction marks them REVOKING, one UsersDeleter call drops their
// users (one commit blocking all their logins, one query ending their
// sessions, one commit dropping them), one store transaction records them
// REVOKED. Per target one batch runs at a time (revokeBatches), and what
// arrives meanwhile forms the next, as with renewals (renewbatch.go). A
// revocation on an idle broker waits for nobody: a batch of one takes the
// single-lease path directly.
//
// Whatever a batch cannot settle plainly (a lease busy under another
// operation or named twice, not found, already ended, changed since read,
// a store or database error, a target without UsersDeleter) goes back to
// its caller with errRevokeAlone, and the caller revokes it on the
// single-lease path, which owns every corner case and records failed
// attempts.

// maxRevokeBatch bounds one revocation batch.
const maxRevokeBatch = 64

// revokeBatches is how many batches one target runs at once. One makes
// the largest batches; with 16 clients revoking in a closed loop two or
// four measured no better (credbroker-bench --scenarios revoke, ratios
// 0.71-1.03 with one, 0.77-0.84 with two, 0.76 with four, on a machine
// too busy for finer distinctions).
const revokeBatches = 1

// revokeLinger bounds how long a batch goroutine, having just run a batch
// of several revocations, waits for as many to be pending again before it
// runs the next (as renewals do, renewbatch.go): the callers it answered
// come back about a round trip later, and without the wait a batch of one
// or two would run first, costing nearly as many round trips and commits
// as a full one.
const revokeLinger = 2 * time.Millisecond

// revokeBatchTimeout bounds one batch of requested revocations, which
// serves many callers and so runs on a context of its own.
const revokeBatchTimeout = time.Minute

// errRevokeAlone tells the caller to take the single-lease path.
var errRevokeAlone = errors.New("revoke alone")

type revokeCall struct {
	ctx  context.Context
	id   string
	done chan revokeResult // buffered: the caller may have gone
}

// revokeResult is one lease's outcome in a batch: the lease as stored,
// and whether this batch ended it; err errRevokeAlone sends it to the
// single-lease path.
type revokeResult struct {
	lease Lease
	ended bool
	err   error
}

// revokeBatched revokes one lease for an admin or its owner through its
// target's batch, or alone at once if no batch of that target runs. It
// returns errRevokeAlone when the caller must use the single-lease path.
func (b *Broker) revokeBatched(ctx context.Context, id string) (Lease, bool, error) {
	// Only a hint: it picks the target's batch, which reads the lease
	// again under its lock (storereads.go); a lease ended or unknown by
	// the hint goes to the single path's fresh read.
	l, err := b.leaseHint(ctx, id)
	if err != nil || l.State.Terminal() {
		// Let the single path give the precise answer.
		return Lease{}, false, errRevokeAlone
	}
	call := &revokeCall{ctx: ctx, id: id, done: make(chan revokeResult, 1)}
	if !b.revocations.add(l.Target, call, true) {
		// Idle: a batch of one, on the single path; what arrives
		// meanwhile queues, and is committed once this is done.
		defer b.revocations.release(l.Target)
		return b.revoke(ctx, id, causeRequest)
	}
	select {
	case r := <-call.done:
		return r.lease, r.ended, r.err
	case <-ctx.Done():
		return Lease{}, false, ctx.Err()
	}
}

// revokeRequested runs one batch of requested revocations and answers
// each call.
func (b *Broker) revokeRequested(calls []*revokeCall) {
	ctx, cancel := context.WithTimeout(context.Background(), revokeBatchTimeout)
	defer cancel()
	var ids []string
	var live []*revokeCall
	for _, c := range calls {
		if err := c.ctx.Err(); err != nil {
			c.done <- revokeResult{err: err}
			continue
		}
		ids = append(ids, c.id)
		live = append(live, c)
	}
	res := b.revokeTogether(ctx, ids, causeRequest)
	for i, c := range live {
		c.done <- res[i]
	}
}

// revokeTogether revokes ids for cause in one batch: res[i] is the
// outcome of ids[i], errRevokeAlone for a lease the caller must revoke on
// the single-lease path. A lease another operation holds, or named twice,
// is sent there rather than waited for.
func (b *Broker) revokeTogether(ctx context.Context, ids []string, cause revokeCause) []revokeResult {
	res := make([]revokeResult, len(ids))
	for i := range res {
		res[i].err = errRevokeAlone
	}
	var unlocks []func()
	defer func() {
		for _, u := range unlocks {
			u()
		}
	}()
	var locked []string
	at := map[string]int{}
	for i, id := range ids {
		unlock, ok := b.leaseMu.tryLock(id)
		if !ok {
			continue
		}
		unlocks = append(unlocks, unlock)
		locked = append(locked, id)
		at[id] = i
	}
	// One read for the batch, under the leases' locks.
	read, errs := b.getLeases(ctx, locked)
	var ls []Lease
	for j, l := range read {
		if errs[j] != nil || l.State.Terminal() {
			continue
		}
		ls = append(ls, l)
	}
	ended, _ := b.revokeLeases(ctx, ls, cause)
	for id, l := range ended {
		res[at[id]] = revokeResult{lease: l.Clone(), ended: true}
	}
	return res
}

// revokeLeases revokes ls, live leases read under their locks, which the
// caller holds, for cause: the active ones are marked REVOKING in one
// store transaction (EndTime set unless the expiry manager asked, so the
// tombstone says REVOKED), the users are dropped with one UsersDeleter
// call per target, and the leases recorded ended in one store
// transaction, with their events, logs and audit records. ended holds the
// leases it ended, by id; failed the others: a store error (to retry
// after a backoff), or nil for a lease the single-lease path must take
// (changed since read, a target without UsersDeleter, a user that could
// not be dropped: that path records the attempt).
func (b *Broker) revokeLeases(ctx context.Context, ls []Lease, cause revokeCause) (ended map[string]Lease, failed map[string]error) {
	ended, failed = map[string]Lease{}, map[string]error{}
	revoking := slices.Clone(ls)
	now := b.wallNow()

	// Mark the active ones REVOKING, in one transaction.
	var marks []int
	for i := range revoking {
		if revoking[i].State.Usable() {
			revoking[i].State = StateRevoking
			if cause != causeExpiry {
				revoking[i].EndTime = now
			}
			marks = append(marks, i)
		}
	}
	if len(marks) > 0 {
		ms := make([]Lease, len(marks))
		for j, i := range marks {
			ms[j] = revoking[i]
		}
		stored, errs := b.store.UpdateLeases(ctx, ms)
		for j, i := range marks {
			switch {
			case errors.Is(errs[j], ErrConflict):
				failed[revoking[i].ID] = nil // changed since read: read it again
			case errs[j] != nil:
				failed[revoking[i].ID] = errs[j]
			default:
				revoking[i] = stored[j]
			}
		}
		revoking = slices.DeleteFunc(revoking, func(l Lease) bool { _, f := failed[l.ID]; return f })
	}
	for _, l := range revoking {
		b.storeRecovered(l.ID)
	}

	// Drop the users, per target.
	byTarget := map[string][]int{}
	for i := range revoking {
		byTarget[revoking[i].Target] = append(byTarget[revoking[i].Target], i)
	}
	var done []Lease
	for target, idx := range byTarget {
		db, err := b.db(target)
		deleter, ok := db.(UsersDeleter)
		if err != nil || !ok {
			for _, i := range idx {
				failed[revoking[i].ID] = nil
			}
			continue
		}
		reqs := make([]DeleteUserRequest, len(idx))
		for j, i := range idx {
			reqs[j] = DeleteUserRequest{Username: revoking[i].Username, ProxyRole: revoking[i].ProxyRole}
		}
		errs := deleter.DeleteUsers(ctx, reqs)
		for j, i := range idx {
			if errs[j] != nil {
				failed[revoking[i].ID] = nil
				continue
			}
			l := revoking[i]
			finishRevocation(&l, now)
			done = append(done, l)
		}
	}
	if len(done) == 0 {
		return ended, failed
	}
	// The users are gone; record it even if the caller has given up.
	stored, errs := b.store.UpdateLeases(context.WithoutCancel(ctx), done)
	for j := range done {
		if errs[j] != nil {
			// Still live in the store, so tried again; dropping a user
			// that is already gone is success.
			failed[done[j].ID] = errs[j]
			continue
		}
		l := stored[j]
		ended[l.ID] = l
		b.leaseEnded(l, b.log.With("lease_id", l.ID, "role", l.Role, "client", l.Client, "username", l.Username), cause)
	}
	return ended, failed
}
