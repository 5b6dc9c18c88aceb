package broker

import (
	"context"
	"time"
)

// Database creates and drops users on one target (one PostgreSQL cluster).
// Every method is safe for concurrent use. Errors never contain a password
// or the admin connection string; an unreachable server is reported
// wrapped in ErrUnavailable.
type Database interface {
	// NewUser creates a LOGIN user that is a member of req.ProxyRole and of
	// the marker role, with SET role = proxy role and VALID UNTIL.
	NewUser(ctx context.Context, req NewUserRequest) error
	// RenewUser moves the user's VALID UNTIL.
	RenewUser(ctx context.Context, req RenewUserRequest) error
	// RenewUsers is RenewUser for many users in one transaction, with an
	// error per request (nil on success): a missing user fails only its own
	// entry; a failure of the transaction fails them all.
	RenewUsers(ctx context.Context, reqs []RenewUserRequest) []error
	// DeleteUser blocks the user's logins, ends its sessions, reassigns and
	// drops what it owns in every database, and drops it. A user that does
	// not exist is success.
	DeleteUser(ctx context.Context, req DeleteUserRequest) error
	// ListManagedUsers lists the members of the marker role (the users the
	// broker made).
	ListManagedUsers(ctx context.Context) ([]string, error)
	// CheckProxyRole reports an error if the proxy role does not exist, can
	// log in, or the broker cannot grant it.
	CheckProxyRole(ctx context.Context, proxyRole string) error
	// Endpoint says where issued users connect.
	Endpoint() Endpoint
	// Close releases the connection pool.
	Close()
}

// Endpoint is where issued users connect.
type Endpoint struct {
	Host     string
	Port     int
	Database string
}

// NewUserRequest asks Database.NewUser for one user.
type NewUserRequest struct {
	Username   string
	Password   string
	ProxyRole  string
	ValidUntil time.Time
	// Verifier, if set, is PasswordHasher.HashPassword(Password), computed
	// ahead so that NewUser need not.
	Verifier string
}

// PasswordHasher is implemented by a Database that stores a hash of the
// password it can compute ahead of NewUser (the broker hashes while it
// waits on the store, or before a caller asks).
type PasswordHasher interface {
	HashPassword(password string) (string, error)
}

// RenewUserRequest asks Database.RenewUser to move a user's VALID UNTIL.
type RenewUserRequest struct {
	Username   string
	ValidUntil time.Time
}

// DeleteUserRequest asks Database.DeleteUser to drop one user; objects it
// owns are reassigned to ProxyRole.
type DeleteUserRequest struct {
	Username  string
	ProxyRole string
}

// Clock is the time source; tests use a controllable one.
type Clock interface {
	Now() time.Time
	// After returns a channel that receives once d has passed.
	After(d time.Duration) <-chan time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

func (SystemClock) Now() time.Time                         { return time.Now() }
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// UsersDeleter is a Database that can drop many users at once, each step
// of the revocation once for all of them (broker/postgres.Engine). When a
// lease's target implements it, the expiry manager revokes a burst of
// expired leases in batches: two PostgreSQL commits and two store commits
// per batch instead of per lease. errs[i] is the result of reqs[i]; a
// missing user is success.
type UsersDeleter interface {
	DeleteUsers(ctx context.Context, reqs []DeleteUserRequest) (errs []error)
}

// DatabaseClock is a Database that tells its server's time. The expiry
// manager checks it before revoking leases as expired: PostgreSQL's clock
// is the one VALID UNTIL follows, and the one every broker of a group
// shares, so a step of one broker host's clock does not revoke anything
// early (expiry.go).
type DatabaseClock interface {
	Now(ctx context.Context) (time.Time, error)
}

// MarkerClaimer is a Database whose managed users are the members of a
// marker role that one broker group owns (broker/postgres.Engine). The
// reconciler drops every member its store does not know, so before a
// broker issues into a target or sweeps it, it claims the marker role for
// its group (LeaseStore.GroupID). ClaimMarker records group as the owner
// if no one is, and returns nil if group is the owner; a role another
// group owns is ErrMarkerOwned, with a message that names the role and
// the fix. After the first claim it is a cheap read.
type MarkerClaimer interface {
	ClaimMarker(ctx context.Context, group string) error
}

// ActivitySampler is a Database that can report the open sessions of the
// users the broker made (broker/postgres.Engine: pg_stat_activity, for
// the members of the marker role). The activity sampler (activity.go)
// calls it on each target at every sample.
type ActivitySampler interface {
	SampleSessions(ctx context.Context) ([]Session, error)
}

// Session is one open session of a managed user, as the target shows it
// to the broker. PostgreSQL shows a role that lacks pg_read_all_stats
// (and is not a member of the session's user) only the user, the process
// id and application_name of another role's session: BackendStart,
// ClientAddr and QueryStart are then zero.
type Session struct {
	Username        string
	PID             int32
	BackendStart    time.Time
	ApplicationName string
	// ClientAddr is the client's IP address; "" for a Unix socket or
	// when not shown.
	ClientAddr string
	// QueryStart is when the session's current or last query began.
	QueryStart time.Time
}
