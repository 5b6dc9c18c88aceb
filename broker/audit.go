package broker

import (
	"slices"
	"sync"
	"time"
)

// Audit actions: what happened to a lease. They are part of the audit
// log's format (audit.Record.Event), so they are never renamed.
const (
	AuditIssue         = "issue"
	AuditRenew         = "renew"
	AuditRevoke        = "revoke"
	AuditExpire        = "expire"
	AuditRevokeFailed  = "revoke_failed"
	AuditReconcileDrop = "reconcile_drop"
	// AuditFirstUse: the activity sampler saw the lease's user connected
	// for the first time (activity.go).
	AuditFirstUse = "first_use"
)

// AuditEvent is one lifecycle event of a lease, for the audit trail. It
// carries names and ids only: the broker never hands a password to the
// auditor, so no implementation can write one down.
type AuditEvent struct {
	Time    time.Time
	Action  string // one of the Audit* constants
	LeaseID string
	Role    string
	// Client is the identity that owns the lease.
	Client   string
	Target   string
	Username string
	// Error is set when the action failed (a revocation that will be
	// retried); it is the engine's message, which never holds a password.
	Error string
	// State is the lease's state after the event (REVOKING or
	// REVOKE_FAILED after a failed revocation), ExpireTime its expiry.
	// Metrics read them: leases by state, and how late an expiry was.
	State      LeaseState
	ExpireTime time.Time
	// Reason says why a lease ended (revoke and expire): one of the
	// Reason* constants.
	Reason string
	// Remote marks an event another instance of the group caused, which
	// this broker learned from the store's change feed (follow.go): an
	// issue, the end of a lease, a failed revocation. It goes to the
	// WatchLifecycle watchers, never to the Auditor (the instance that
	// caused it audited it). Counts of the group's leases (quotas, the
	// leases gauge) apply it; counts of this instance's work (metrics'
	// counters) skip it. It may repeat what this broker already reported
	// (the feed also carries this broker's own writes): apply it
	// idempotently, by lease id.
	Remote bool
	// Usage is the lease's database-side usage as stored with the event
	// (first_use, and the final usage on revoke and expire).
	Usage LeaseUsage
}

// Why a lease ended (AuditEvent.Reason). A revocation the expiry manager
// had to retry keeps the reason of the lease's state: one begun on
// disconnect and finished by a retry reads as revoked.
const (
	ReasonExpired    = "expired"
	ReasonRevoked    = "revoked"
	ReasonDisconnect = "disconnect"
	// ReasonUnused: the lease's user had no session for its role's
	// revoke_unused_after (activity.go).
	ReasonUnused = "unused"
	// ReasonReconcile: the reconciler found the lease's user gone (dropped
	// outside the broker, or the store was restored from a backup taken
	// before the lease was revoked) and ended the lease.
	ReasonReconcile = "reconcile"
)

// Auditor records lifecycle events. The broker calls it synchronously
// after the event is committed to the store, so an implementation must be
// quick and must not call back into the broker. Requests (who asked, from
// where, and whether they were allowed) are recorded by the gRPC layer;
// this interface covers what also happens without a request: expiry and
// reconciliation.
type Auditor interface {
	AuditLease(AuditEvent)
}

// WatchLifecycle calls fn with every lifecycle event, as the Auditor is
// called: synchronously, after the event is committed to the store, so fn
// must be quick and must not call back into the broker. Watchers are called
// in the order they were registered. It is how the gRPC
// layer keeps its counts of active leases without scanning the store.
// Call the returned function to stop the calls.
func (b *Broker) WatchLifecycle(fn func(AuditEvent)) (stop func()) {
	return b.watchers.add(fn)
}

// lifecycleWatchers holds the functions WatchLifecycle registered, called
// in the order they were registered.
type lifecycleWatchers struct {
	mu   sync.RWMutex
	next int
	fns  []watcher
}

type watcher struct {
	id int
	fn func(AuditEvent)
}

func (w *lifecycleWatchers) add(fn func(AuditEvent)) func() {
	w.mu.Lock()
	defer w.mu.Unlock()
	id := w.next
	w.next++
	w.fns = append(w.fns, watcher{id: id, fn: fn})
	var once sync.Once
	return func() {
		once.Do(func() {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.fns = slices.DeleteFunc(w.fns, func(x watcher) bool { return x.id == id })
		})
	}
}

func (w *lifecycleWatchers) notify(ev AuditEvent) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	for _, x := range w.fns {
		x.fn(ev)
	}
}

// audit sends ev to the configured Auditor, if any, and to the watchers.
func (b *Broker) audit(action string, l Lease, errMsg string) {
	b.auditReason(action, l, errMsg, "")
}

// auditReason is audit with the reason a lease ended.
func (b *Broker) auditReason(action string, l Lease, errMsg, reason string) {
	b.notify(action, l, errMsg, reason, false)
}

// notify tells the watchers, and the Auditor unless the event is remote.
func (b *Broker) notify(action string, l Lease, errMsg, reason string, remote bool) {
	ev := AuditEvent{
		Time:     b.clock.Now(),
		Action:   action,
		LeaseID:  l.ID,
		Role:     l.Role,
		Client:   l.Client,
		Target:   l.Target,
		Username: l.Username,
		Error:    errMsg,

		State:      l.State.Public(),
		ExpireTime: l.ExpireTime,
		Reason:     reason,
		Remote:     remote,
		Usage:      l.Usage,
	}
	b.watchers.notify(ev)
	if b.cfg.Auditor != nil && !remote {
		b.cfg.Auditor.AuditLease(ev)
	}
}
