package broker

import "time"

// Audit actions: what happened to a lease. They are part of the audit
// log's format (audit.Record.Event), so they are never renamed.
const (
	AuditIssue         = "issue"
	AuditRenew         = "renew"
	AuditRevoke        = "revoke"
	AuditExpire        = "expire"
	AuditRevokeFailed  = "revoke_failed"
	AuditReconcileDrop = "reconcile_drop"
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
}

// Auditor records lifecycle events. The broker calls it synchronously
// after the event is committed to the store, so an implementation must be
// quick and must not call back into the broker. Requests (who asked, from
// where, and whether they were allowed) are recorded by the gRPC layer;
// this interface covers what also happens without a request: expiry and
// reconciliation.
type Auditor interface {
	AuditLease(AuditEvent)
}

// audit sends ev to the configured Auditor, if any.
func (b *Broker) audit(action string, l Lease, errMsg string) {
	if b.cfg.Auditor == nil {
		return
	}
	b.cfg.Auditor.AuditLease(AuditEvent{
		Time:     b.clock.Now(),
		Action:   action,
		LeaseID:  l.ID,
		Role:     l.Role,
		Client:   l.Client,
		Target:   l.Target,
		Username: l.Username,
		Error:    errMsg,
	})
}
