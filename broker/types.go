package broker

import (
	"time"
)

// LeaseState is where a lease is in its lifecycle.
type LeaseState int

const (
	StateUnspecified LeaseState = iota
	// StateActive: the user exists and may log in.
	StateActive
	// StateRevoking: revocation has started (logins blocked); the user is being dropped.
	StateRevoking
	// StateRevoked: revoked before expiry; the user is gone. A tombstone.
	StateRevoked
	// StateExpired: reached its expire time; the user is gone. A tombstone.
	StateExpired
	// StateRevokeFailed: revocation failed after its retry budget; retried later.
	StateRevokeFailed
	// StateIssuing: written while CREATE ROLE runs, beside it rather than
	// after it (Broker.Issue); the user may or may not exist yet. The
	// broker promotes it to Active in the background once the credential
	// is out (promote.go); recovery treats one whose user exists as
	// Active and removes one whose user does not (reconcile.go). It
	// behaves as Active everywhere else (Usable), and the API and metrics
	// show it as Active (Public). It is last so that the stored numbers
	// of the other states stay what they were.
	StateIssuing
)

var stateNames = [...]string{"unspecified", "active", "revoking", "revoked", "expired", "revoke_failed", "issuing"}

func (s LeaseState) String() string {
	if s < 0 || int(s) >= len(stateNames) {
		return "unknown"
	}
	return stateNames[s]
}

// ParseLeaseState is the inverse of String; it returns false for an unknown name.
func ParseLeaseState(name string) (LeaseState, bool) {
	for i, n := range stateNames {
		if n == name {
			return LeaseState(i), true
		}
	}
	return StateUnspecified, false
}

// Terminal reports whether the lease's user is gone for good (a tombstone).
func (s LeaseState) Terminal() bool { return s == StateRevoked || s == StateExpired }

// Live reports whether the lease's user may still exist in PostgreSQL and so
// the lease still needs the expiry manager's attention.
func (s LeaseState) Live() bool {
	return s == StateActive || s == StateRevoking || s == StateRevokeFailed || s == StateIssuing
}

// Usable reports whether the lease's credential is, or is about to be,
// good for logging in and no revocation has begun: Active, or Issuing.
// Renewal, expiry, revocation, quotas and the disconnect and activity
// checks treat both alike.
func (s LeaseState) Usable() bool { return s == StateActive || s == StateIssuing }

// Public is the state the API, the audit log and the metrics show:
// Issuing is shown as Active. Only the issuing caller can name a lease
// before its credential is out (the id is random and first leaves the
// broker in the issue's response), and by then the lease is durable and
// its user exists: to everyone who can ask, it is active. An admin's
// listing may show an issue still in flight as active a few milliseconds
// early; revoking it then waits for the issue (Broker.Issue holds the
// lease's lock) and drops the user.
func (s LeaseState) Public() LeaseState {
	if s == StateIssuing {
		return StateActive
	}
	return s
}

// Role is a broker role: the name clients ask for, and the proxy role on a
// target whose privileges issued users inherit.
type Role struct {
	Name       string
	Target     string
	ProxyRole  string
	DefaultTTL time.Duration
	MaxTTL     time.Duration
	// RevokeUnusedAfter, when positive, revokes a lease whose user has
	// had no session for that long: never connected since it was issued,
	// or disconnected since it was last seen (activity.go). Zero keeps
	// unused leases until they expire.
	RevokeUnusedAfter time.Duration
}

// Lease is one issued user. It holds everything revocation needs (target,
// username, proxy role), so a lease can be revoked after its role has left
// the configuration.
type Lease struct {
	ID            string
	Role          string
	Client        string
	Target        string
	Username      string
	ProxyRole     string
	IssueTime     time.Time
	ExpireTime    time.Time
	MaxExpireTime time.Time
	State         LeaseState
	Metadata      map[string]string
	// LastError is the latest revocation error, for admins.
	LastError string
	// RevokeAttempts counts failed revocation attempts since the last success.
	RevokeAttempts int
	// NextAttempt is when a failed revocation is retried (zero: as soon as due).
	NextAttempt time.Time
	// EndTime is when the lease was revoked or expired; zero while it is live.
	EndTime time.Time
	// RevokeOnDisconnect: revoke when no KeepAlive stream has named the lease
	// for a grace period.
	RevokeOnDisconnect bool
	// ValidUntilBehind records that the user's VALID UNTIL may be earlier
	// than ExpireTime plus the grace: a batched renewal stored the lease
	// while PostgreSQL refused the new VALID UNTIL. The next renewal then
	// renews the user even when the lease has nothing left to extend, so
	// the safety net ends at or after the lease.
	ValidUntilBehind bool
	// Usage is what the activity sampler saw of the user's sessions
	// (activity.go); the zero value until it was first sampled connected.
	Usage LeaseUsage
	// Revision is the store's version of the record, for compare-and-set
	// writes. The store sets it; callers pass back what they read.
	Revision uint64
}

// LeaseUsage is what the broker saw of a lease's user in the target's
// pg_stat_activity, sample by sample (activity.go). Sessions shorter than
// the sampling interval can fall between two samples and go unseen.
type LeaseUsage struct {
	// Sessions is the number of open sessions at the last sample that
	// saw the lease's target (0 once the lease ended).
	Sessions int
	// PeakSessions is the most sessions seen open at once.
	PeakSessions int
	// SessionsSeen counts the distinct sessions seen over the lease's
	// life.
	SessionsSeen int
	// FirstSeen and LastSeen are the first and the last sample that saw
	// a session open; zero: never seen connected.
	FirstSeen time.Time
	LastSeen  time.Time
	// ApplicationName is the application_name of the newest session seen.
	ApplicationName string
	// ClientAddr is the client address of the newest session seen, and
	// LastQueryStart the latest query_start of its sessions: PostgreSQL
	// shows them to the broker only with pg_read_all_stats ("" and zero
	// without). ClientAddr is also "" for a Unix-socket session.
	ClientAddr     string
	LastQueryStart time.Time
}

// Used reports whether the lease's user was ever seen connected.
func (u LeaseUsage) Used() bool { return !u.FirstSeen.IsZero() }

// Clone returns a deep copy of l (the metadata map is copied).
func (l Lease) Clone() Lease {
	if l.Metadata != nil {
		m := make(map[string]string, len(l.Metadata))
		for k, v := range l.Metadata {
			m[k] = v
		}
		l.Metadata = m
	}
	return l
}

// Intent is written before CREATE ROLE and removed when the lease is stored
// (in the same transaction). An intent left behind by a crash names a user
// that may exist without a lease; the reconciler drops it.
type Intent struct {
	LeaseID    string
	Target     string
	Username   string
	ProxyRole  string
	CreateTime time.Time
	// Group is the broker group (LeaseStore.GroupID) that wrote the
	// intent; "" in intents written before groups existed, which are the
	// store's own group's. An intent lives in its group's own store, so a
	// broker never reads another group's intents in the normal course;
	// the field guards the abnormal one, a store copied or restored into
	// another group's place (a bbolt file copied to a second host, an
	// etcd prefix restored under another): the reconciler neither settles
	// nor drops users of an intent naming another group, since their
	// users live under that group's marker role.
	Group string
}

// Credential is what a client logs in with. The password exists only in the
// response to the issuing caller; it is never stored or logged.
type Credential struct {
	Username string
	Password string
	Host     string
	Port     int
	Database string
}

// LeaseFilter selects leases to list. Empty fields match everything.
type LeaseFilter struct {
	Role   string
	Client string
	State  LeaseState // StateUnspecified: every state
	// Limit caps the number of leases returned (0: no cap).
	Limit int
	// After continues a listing after this lease id (ids are listed in
	// ascending order); empty starts at the beginning.
	After string
}

// Match reports whether l passes the filter's role, client and state. A
// filter on Active matches Issuing leases too (see LeaseState.Public).
func (f LeaseFilter) Match(l *Lease) bool {
	return (f.Role == "" || f.Role == l.Role) &&
		(f.Client == "" || f.Client == l.Client) &&
		(f.State == StateUnspecified || f.State == l.State || f.State == StateActive && l.State == StateIssuing)
}

// ExpiryEntry is one entry of the store's expiry index: a live lease and the
// instant it needs attention.
type ExpiryEntry struct {
	Expire  time.Time
	LeaseID string
	// What start-up and reconciliation need of a live lease, when the
	// store keeps it in its index (Username is "" when it does not; then
	// read the lease), so that they need not read every lease record.
	State              LeaseState
	Target             string
	Username           string
	RevokeOnDisconnect bool
}
