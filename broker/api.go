package broker

import (
	"log/slog"
	"time"
)

// Config configures a Broker. New fills defaults for zero values.
type Config struct {
	Store LeaseStore
	// Databases maps target names to their engines.
	Databases map[string]Database
	Roles     []Role
	Clock     Clock
	Logger    *slog.Logger

	// ValidUntilGrace is added to a lease's expiry for the user's VALID
	// UNTIL: a safety net for when the broker is down, not the mechanism.
	ValidUntilGrace time.Duration // default 1m
	// TombstoneRetention is how long revoked and expired leases are kept.
	TombstoneRetention time.Duration // default 24h
	// ReconcileInterval is how often intents and marker-role members are settled.
	ReconcileInterval time.Duration // default 5m
	// RevokeConcurrency bounds concurrent revocations by the expiry manager,
	// per target: each target has its own workers, so one that hangs does
	// not delay the others.
	RevokeConcurrency int // default 4
	// RevokeRate bounds expiry-driven revocations per second (a mass expiry
	// must not overload PostgreSQL).
	// Revocations of a burst go in batches (expiry.go), so PostgreSQL
	// takes thousands a second; at 100/s an expired credential could
	// outlive its lease by 100 s in a burst of 10,000.
	RevokeRate float64 // default 1000
	// RenewBatches bounds the renewal batches one target runs at once
	// (each one PostgreSQL transaction and one store commit; see
	// renewbatch.go). More than one lets the next batch start while the
	// previous one waits on its commits, but makes smaller batches, hence
	// more commits: on two cores shared with PostgreSQL, one at a time
	// renewed fastest (bin/credbroker-bench --scenarios renew: 0.92 of the
	// baseline with 1, 0.60 with 2, 0.53 with 4, 0.48 with 8).
	RenewBatches int // default 1
	// RenewLinger bounds how long a target's batch goroutine, having just
	// committed a batch of several renewals, waits for as many to be
	// pending again before it commits the next (renewbatch.go); negative
	// turns the wait off. A renewal on an idle broker never waits.
	RenewLinger time.Duration // default DefaultRenewLinger
	// IssuePool bounds how many issues per role are made ready ahead,
	// each with its intent durable and its password hashed
	// (issuepool.go): the pool holds the role's observed issue rate times
	// IssuePoolHorizon, at least min(IssuePoolFloor, IssuePool) and at
	// most IssuePool. Negative turns it off.
	IssuePool int // default 64
	// RevokeRetries is how many failed attempts mark a lease REVOKE_FAILED.
	RevokeRetries int // default 5
	// RetryBaseDelay and RetryMaxDelay bound the exponential backoff (with
	// jitter) between failed revocation attempts.
	RetryBaseDelay time.Duration // default 1s
	RetryMaxDelay  time.Duration // default 1m
	// FailedRetryInterval is how often a REVOKE_FAILED lease is tried again.
	FailedRetryInterval time.Duration // default 10m
	// DisconnectGrace is how long a revoke_on_disconnect lease may go
	// without any KeepAlive stream naming it.
	DisconnectGrace time.Duration // default 30s
	// Leadership elects the one broker of a group that runs the group's
	// background work (leadership.go); nil: this broker is its group's
	// only member and always leads.
	Leadership Leadership
	// ReconcileConfirm is how long a marker-role member no lease knows,
	// or an intent whose lease never came, must stay so before the
	// reconciler drops it: it acts only when two sweeps at least this far
	// apart agree. With several brokers in a group an issue in flight on
	// another instance is not in this broker's memory, and PostgreSQL
	// cannot be fenced; the session TTL is a fit value. Zero (one broker,
	// which knows its own issues in flight) acts on the first sweep.
	ReconcileConfirm time.Duration
	// ActivityInterval is how often the targets' sessions are sampled
	// for each lease's usage and unused leases revoked (activity.go);
	// negative turns the sampling loop off (SampleActivity still works).
	ActivityInterval time.Duration // default 30s
	// Auditor, when set, is told of every lifecycle event (issue, renew,
	// revoke, expire, failed revocation, reconcile drop); see audit.go.
	Auditor Auditor

	// Instance names this broker in its group (stream marks, logs);
	// default: a random name. Brokers sharing a store must differ.
	Instance string
	// CheckDatabaseClock makes the expiry manager check a lease due by
	// Clock against its target's clock (DatabaseClock) before revoking it,
	// so that a step of this host's clock alone revokes nothing early
	// (expiry.go). brokerd sets it when it runs on the system clock; a
	// test that drives Clock by hand against a real database leaves it
	// off, since that database's clock does not follow.
	CheckDatabaseClock bool
	// Standby starts the broker without running the group's background
	// work (expiry, reconciliation, purges, disconnect revocations) until
	// SetLeading(true): for instances of a group, of which one leads. A
	// broker alone on its store leaves it false.
	Standby bool
}

// IssueRequest asks for a new credential.
type IssueRequest struct {
	Role string
	// TTL: zero means the role's default; above the role's max is capped;
	// negative is invalid.
	TTL time.Duration
	// Client is the authenticated identity of the caller.
	Client             string
	Metadata           map[string]string
	RevokeOnDisconnect bool
}

// RevokeSelector selects leases for an admin revocation. At least one field
// must be set; the selectors are combined with AND when several are set.
type RevokeSelector struct {
	IDs    []string
	Role   string
	Client string
}

// EventType says what happened to a lease, for KeepAlive subscribers.
type EventType int

const (
	EventRenewed EventType = iota + 1
	EventMaxTTLReached
	EventRevoked
	EventExpired
	EventNotFound
)

// Event is a change to a lease pushed to subscribers.
type Event struct {
	Type  EventType
	Lease Lease
}
