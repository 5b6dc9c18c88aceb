package broker

import (
	"context"
	"errors"
	"fmt"
	"time"
)

func (b *Broker) setInflight(id string, on bool) {
	b.inflightMu.Lock()
	defer b.inflightMu.Unlock()
	if on {
		b.inflight[id] = struct{}{}
	} else {
		delete(b.inflight, id)
	}
}

// inflightIDs returns the ids of the issues in flight in this process.
func (b *Broker) inflightIDs() map[string]bool {
	b.inflightMu.Lock()
	defer b.inflightMu.Unlock()
	out := make(map[string]bool, len(b.inflight))
	for id := range b.inflight {
		out[id] = true
	}
	return out
}

func (b *Broker) isInflight(id string) bool {
	b.inflightMu.Lock()
	defer b.inflightMu.Unlock()
	_, ok := b.inflight[id]
	return ok
}

// settleIntent drops the user an intent names and then the intent. It is
// idempotent: dropping a missing user is success.
func (b *Broker) settleIntent(ctx context.Context, in Intent) error {
	db, err := b.db(in.Target)
	if err != nil {
		return err
	}
	if err := db.DeleteUser(ctx, DeleteUserRequest{Username: in.Username, ProxyRole: in.ProxyRole}); err != nil {
		return fmt.Errorf("drop user of intent %s: %w", in.LeaseID, err)
	}
	return b.store.DeleteIntent(ctx, in.LeaseID)
}

// ReconcileResult counts what a reconciliation did.
type ReconcileResult struct {
	IntentsSettled int // intents whose user was dropped (or already gone)
	IntentsCleared int // intents whose lease existed
	IntentsUnused  int // intents whose user was never created (a crash before CREATE ROLE, or a reservation)
	UsersDropped   int // marker-role members no lease or intent knew
	LeasesSettled  int // live leases whose user was gone, ended as revoked
	// IssuingPromoted counts Issuing leases whose user exists, written as
	// Active (a promotion lost to a crash or a store error); IssuingRemoved
	// those whose user does not exist (a crash before CREATE ROLE
	// committed), deleted: no caller holds their credential.
	IssuingPromoted int
	IssuingRemoved  int
	// Pending counts the users and intents found unknown that wait for a
	// second sweep at least Config.ReconcileConfirm later to agree.
	Pending int
}

// Suspect keys: what the reconciler would act on, by kind.
func suspectUser(target, user string) string { return "user\x00" + target + "\x00" + user }
func suspectSettle(leaseID string) string    { return "settle\x00" + leaseID }
func suspectUnused(leaseID string) string    { return "unused\x00" + leaseID }
func suspectGone(leaseID string) string      { return "gone\x00" + leaseID }
func suspectIssuing(leaseID string) string   { return "issuing\x00" + leaseID }

// confirmed reports whether the reconciler may act on the suspect key now:
// at once when Config.ReconcileConfirm is zero, else only when an earlier
// sweep found the same suspect at least ReconcileConfirm before now (two
// sweeps at least that far apart agree). It records key as seen by this
// sweep.
func (b *Broker) confirmed(key string, now time.Time, seen map[string]bool) bool {
	if b.cfg.ReconcileConfirm <= 0 {
		return true
	}
	seen[key] = true
	b.suspectMu.Lock()
	defer b.suspectMu.Unlock()
	first, ok := b.suspects[key]
	if !ok {
		if b.suspects == nil {
			b.suspects = make(map[string]time.Time)
		}
		b.suspects[key] = now
		return false
	}
	return now.Sub(first) >= b.cfg.ReconcileConfirm
}

// keepSuspects forgets the suspects this sweep did not find again: a later
// sweep must see them twice anew.
func (b *Broker) keepSuspects(seen map[string]bool) {
	b.suspectMu.Lock()
	defer b.suspectMu.Unlock()
	for k := range b.suspects {
		if !seen[k] {
			delete(b.suspects, k)
		}
	}
}

// resetSuspects forgets every suspect: a new leader confirms what it sees
// itself.
func (b *Broker) resetSuspects() {
	b.suspectMu.Lock()
	b.suspects = nil
	b.suspectMu.Unlock()
}

// Reconcile makes PostgreSQL agree with the store: every intent left by a
// crash is settled (its user dropped, unless its lease exists), and every
// member of a target's marker role that no live lease or pending intent
// knows is dropped. It is safe to run while the broker serves: the users
// are listed before the intents and leases, and an intent is written before
// its user exists, so a user being issued is always known.
//
// A target's marker role is swept only while this broker group owns it
// (claimMarker, checked before every sweep): the members of a role another
// group owns are that group's users. Intents another group wrote (a copied
// store) are left alone.
//
// In a group of brokers (Config.Leadership) only the leader reconciles:
// before each DROP it decides on its own it confirms its term
// (ErrNotLeader ends the sweep), and it drops a user or settles an intent
// only when two sweeps Config.ReconcileConfirm apart agree, since an issue
// in flight on another instance is not in this broker's memory.
func (b *Broker) Reconcile(ctx context.Context) (ReconcileResult, error) {
	var res ReconcileResult
	var errs []error
	now := b.clock.Now()
	seen := map[string]bool{}
	// Only a sweep that looked at everything may forget a suspect it did
	// not see; one cut short (ErrNotLeader) forgets nothing.
	swept := false
	defer func() {
		if swept {
			b.keepSuspects(seen)
		}
	}()

	// 0. The live leases before the users are listed: a lease stored
	// before the listing has a user created before it, so one missing
	// from the listing was dropped since (outside the broker, or a store
	// restored from a backup taken before its lease was revoked). Read
	// after the listing, a lease issued in between would look so too.
	type liveUser struct {
		id, target, username string
		state                LeaseState
	}
	var before []liveUser
	if err := b.store.ScanExpiry(ctx, func(e ExpiryEntry) bool {
		if e.Username != "" {
			before = append(before, liveUser{e.LeaseID, e.Target, e.Username, e.State})
		}
		return true
	}); err != nil {
		return res, fmt.Errorf("scan live leases: %w", err)
	}

	// But an issue stores its lease (Issuing) before or beside its CREATE
	// ROLE (promote.go), so the lease of an issue in flight when the users
	// are listed may have a user committed after the listing; and the
	// issue may have returned by the time the sweep decides, when
	// isInflight says nothing. So the issues in flight now, after the scan
	// and before the listing, are left out of the end of the sweep (live
	// leases whose user is gone); an issue that finished before this point
	// created its user before the listing. (Another instance's issues are
	// not in this memory: a group acts only when two sweeps agree.)
	busy := b.inflightIDs()

	// 1. Users first (see the ordering argument above).
	users := make(map[string][]string, len(b.dbs))
	exists := make(map[string]map[string]bool, len(b.dbs)) // by target: the same users, as a set
	for name, db := range b.dbs {
		if err := b.claimMarker(ctx, name); err != nil {
			if errors.Is(err, ErrMarkerOwned) {
				b.log.Error("reconcile: not sweeping a target whose marker role this broker group does not own", "target", name, "err", err)
			}
			errs = append(errs, err)
			continue
		}
		list, err := db.ListManagedUsers(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("target %s: list managed users: %w", name, err))
			continue
		}
		users[name] = list
		exists[name] = make(map[string]bool, len(list))
		for _, u := range list {
			exists[name][u] = true
		}
	}

	// 2. Intents.
	intents, err := b.store.ListIntents(ctx)
	if err != nil {
		return res, errors.Join(append(errs, fmt.Errorf("list intents: %w", err))...)
	}
	known := make(map[string]map[string]bool, len(b.dbs))
	remember := func(target, user string) {
		if known[target] == nil {
			known[target] = make(map[string]bool)
		}
		known[target][user] = true
	}
	for _, in := range intents {
		remember(in.Target, in.Username)
	}

	// 3. Live leases, from the expiry index, which names each live lease's
	// user: a large store is mostly tombstones, and reading every record
	// made start-up on a million records take seconds and hundreds of MB.
	// An entry without details (an older file) costs a lookup.
	var bare []string
	err = b.store.ScanExpiry(ctx, func(e ExpiryEntry) bool {
		if e.Username == "" {
			bare = append(bare, e.LeaseID)
		} else {
			remember(e.Target, e.Username)
		}
		return true
	})
	if err != nil {
		return res, errors.Join(append(errs, fmt.Errorf("scan live leases: %w", err))...)
	}
	for _, id := range bare {
		l, err := b.store.GetLease(ctx, id)
		if errors.Is(err, ErrLeaseNotFound) {
			continue // ended meanwhile: its user is gone or going
		}
		if err != nil {
			return res, errors.Join(append(errs, fmt.Errorf("get lease: %w", err))...)
		}
		if l.State.Live() {
			remember(l.Target, l.Username)
		}
	}

	// Settle intents that no issue in this process is working on: they
	// were left by a crash.
	for _, in := range intents {
		if b.isInflight(in.LeaseID) {
			continue
		}
		if b.foreignIntent(in) {
			// Its user, if any, is a member of the other group's marker
			// role: that group's to settle. remember() above kept it out
			// of this sweep too.
			b.log.Warn("reconcile: leaving an intent of another broker group alone (was this store copied?)",
				"lease_id", in.LeaseID, "username", in.Username, "target", in.Target, "intent_group", in.Group)
			continue
		}
		if _, err := b.store.GetLease(ctx, in.LeaseID); err == nil {
			if err := b.store.DeleteIntent(ctx, in.LeaseID); err != nil {
				errs = append(errs, err)
			} else {
				res.IntentsCleared++
			}
			continue
		} else if !errors.Is(err, ErrLeaseNotFound) {
			errs = append(errs, err)
			continue
		}
		if listed, ok := exists[in.Target]; ok && !listed[in.Username] {
			if !b.confirmed(suspectUnused(in.LeaseID), now, seen) {
				res.Pending++
				continue
			}
			// Its user was not among the target's managed users, listed
			// before the intents were read, and no issue is working on it:
			// it was never created (the process died before CREATE ROLE,
			// or this was a reservation, issuepool.go). Nothing to drop,
			// and nothing for the audit log to call a drop.
			if err := b.store.DeleteIntent(ctx, in.LeaseID); err != nil {
				errs = append(errs, err)
			} else {
				res.IntentsUnused++
				b.log.Debug("reconcile: removed an intent whose user was never created", "lease_id", in.LeaseID, "username", in.Username)
			}
			continue
		}
		if !b.confirmed(suspectSettle(in.LeaseID), now, seen) {
			res.Pending++
			continue
		}
		if err := b.confirmLeading(ctx); err != nil {
			return res, errors.Join(append(errs, fmt.Errorf("settle intent %s: %w", in.LeaseID, err))...)
		}
		if err := b.settleIntent(ctx, in); err != nil {
			errs = append(errs, err)
			continue
		}
		res.IntentsSettled++
		b.log.Info("reconcile: settled an intent left by a crash", "lease_id", in.LeaseID, "username", in.Username, "target", in.Target)
		b.audit(AuditReconcileDrop, Lease{ID: in.LeaseID, Target: in.Target, Username: in.Username}, "")
	}

	// Drop marker-role members nothing knows.
	for target, list := range users {
		db := b.dbs[target]
		for _, u := range list {
			if known[target][u] {
				continue
			}
			if !b.confirmed(suspectUser(target, u), now, seen) {
				res.Pending++
				continue
			}
			if err := b.confirmLeading(ctx); err != nil {
				return res, errors.Join(append(errs, fmt.Errorf("target %s: drop unknown user %s: %w", target, u, err))...)
			}
			// The proxy role to reassign owned objects to is unknown for a
			// user no record names; DeleteUser with an empty ProxyRole drops
			// what it owns instead.
			if err := db.DeleteUser(ctx, DeleteUserRequest{Username: u}); err != nil {
				errs = append(errs, fmt.Errorf("target %s: drop unknown user %s: %w", target, u, err))
				continue
			}
			res.UsersDropped++
			b.log.Warn("reconcile: dropped a managed user that no lease knows", "username", u, "target", target)
			b.audit(AuditReconcileDrop, Lease{Target: target, Username: u}, "")
		}
	}

	// End the live leases whose user is gone (step 0). The revocation's
	// DROP of a missing user is success, so the lease ends REVOKED at
	// once, audited with reason reconcile, instead of failing to be
	// revoked, or waiting for its expiry as if its user could log in.
	var gone []liveUser
	for _, l := range before {
		if err := ctx.Err(); err != nil {
			// Given up: every lease left would fail alike.
			return res, errors.Join(append(errs, err)...)
		}
		if busy[l.id] {
			continue // the listing may predate its user
		}
		if l.state == StateIssuing {
			settled, err := b.settleIssuing(ctx, l.id, exists[l.target], now, seen, &res)
			if errors.Is(err, ErrNotLeader) {
				return res, errors.Join(append(errs, err)...)
			}
			if err != nil {
				errs = append(errs, err)
			}
			if settled || err != nil {
				continue
			}
			// Issued by this process, or promoted since the scan: a live
			// lease like any other.
		}
		if listed, ok := exists[l.target]; !ok || listed[l.username] {
			continue
		}
		if !b.confirmed(suspectGone(l.id), now, seen) {
			res.Pending++
			continue
		}
		gone = append(gone, l)
	}
	// In batches, as expiries are (revokebatch.go): a store restored from
	// an older backup can have thousands, and one revocation each (two
	// store commits apiece) held a sole broker's start-up for minutes.
	for start := 0; start < len(gone); start += maxRevokeBatch {
		if err := ctx.Err(); err != nil {
			return res, errors.Join(append(errs, err)...)
		}
		chunk := gone[start:min(start+maxRevokeBatch, len(gone))]
		ids := make([]string, len(chunk))
		for i, l := range chunk {
			ids[i] = l.id
		}
		for i, r := range b.revokeTogether(ctx, ids, causeReconcile) {
			l, ended, err := chunk[i], r.ended, r.err
			if errors.Is(err, errRevokeAlone) {
				_, ended, err = b.revoke(ctx, l.id, causeReconcile)
			}
			switch {
			case errors.Is(err, ErrLeaseNotFound):
			case err != nil:
				errs = append(errs, fmt.Errorf("end lease %s, whose user is gone: %w", l.id, err))
			case ended:
				res.LeasesSettled++
				b.log.Warn("reconcile: a live lease's user was gone (dropped outside the broker, or the store was restored from a backup); ended the lease",
					"lease_id", l.id, "username", l.username, "target", l.target)
			}
		}
	}
	swept = true
	return res, errors.Join(errs...)
}

// settleIssuing settles an Issuing lease the sweep found live before it
// listed the users (listed: its target's users, nil when they could not
// be listed). Its issue is done, or was cut short by a crash, unless one
// is working on it: in this process (in flight), or on another instance
// of the group, which is why a removal waits for two sweeps
// ReconcileConfirm apart to agree, as a dropped intent does.
//
//   - Its user exists: the credential may be in its caller's hands (the
//     issue returned, and its promotion was lost), so the lease is
//     promoted to Active, as the issue would have.
//   - Its user does not exist: CREATE ROLE never committed, the issue
//     failed and no caller holds a credential; the lease is deleted, not
//     ended as a tombstone, since it was never issued.
//
// Either write is a compare-and-set on the lease as read here, so a lease
// that moved on meanwhile (promoted, renewed, revoked) is left alone.
//
// A lease this process issued and has not promoted yet (promote.go), or
// one no longer Issuing when read, is not settled here (settled false):
// the caller treats it as any live lease, so one whose user was dropped
// outside the broker is ended, not removed.
func (b *Broker) settleIssuing(ctx context.Context, id string, listed map[string]bool, now time.Time, seen map[string]bool, res *ReconcileResult) (settled bool, err error) {
	if b.awaitingPromotion(id) {
		return false, nil
	}
	if listed == nil || b.isInflight(id) {
		return true, nil
	}
	l, err := b.store.GetLease(ctx, id)
	if errors.Is(err, ErrLeaseNotFound) {
		return true, nil
	}
	if err != nil {
		return true, fmt.Errorf("settle issuing lease %s: %w", id, err)
	}
	if l.State != StateIssuing {
		return false, nil
	}
	if listed[l.Username] {
		l.State = StateActive
		_, err := b.store.UpdateLease(ctx, l)
		switch {
		case err == nil:
			res.IssuingPromoted++
			b.log.Info("reconcile: promoted an issued lease left Issuing", "lease_id", id, "username", l.Username)
		case errors.Is(err, ErrConflict), errors.Is(err, ErrLeaseNotFound):
		default:
			return true, fmt.Errorf("promote issuing lease %s: %w", id, err)
		}
		return true, nil
	}
	if !b.confirmed(suspectIssuing(id), now, seen) {
		res.Pending++
		return true, nil
	}
	if err := b.confirmLeading(ctx); err != nil {
		return true, fmt.Errorf("remove issuing lease %s: %w", id, err)
	}
	// Read again right before the delete, which takes no revision: a
	// lease promoted or revoked since the read above stays.
	if cur, err := b.store.GetLease(ctx, id); err != nil || cur.State != StateIssuing || cur.Revision != l.Revision {
		return true, nil
	}
	if err := b.store.DeleteLease(ctx, id); err != nil {
		return true, fmt.Errorf("remove issuing lease %s: %w", id, err)
	}
	b.queue.Remove(id)
	res.IssuingRemoved++
	b.log.Info("reconcile: removed an Issuing lease whose user was never created", "lease_id", id, "username", l.Username)
	return true, nil
}
