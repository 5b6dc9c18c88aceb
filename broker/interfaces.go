package broker

import (
	"context"
	"time"
)

// LeaseStore persists leases and intents. Its operations are ones a
// distributed KV (etcd) can implement too: compare-and-set writes of one
// lease, a range scan by expiry, lookup by id, and listing by role/client.
//
// Implementations return ErrLeaseNotFound for a missing lease, ErrConflict
// when a compare-and-set loses, ErrExists when creating a lease whose id is
// taken, and ErrClosed after Close.
type LeaseStore interface {
	// PutIntent records that a user is about to be created.
	PutIntent(ctx context.Context, in Intent) error
	// DeleteIntent removes an intent; a missing intent is not an error.
	DeleteIntent(ctx context.Context, leaseID string) error
	// ListIntents returns every intent left in the store.
	ListIntents(ctx context.Context) ([]Intent, error)

	// CreateLease stores a new lease and, atomically with it, deletes the
	// intent of the same id. It sets l.Revision to the stored revision.
	CreateLease(ctx context.Context, l *Lease) error
	// UpdateLease writes l if the stored lease's revision equals l.Revision,
	// and returns the lease as stored (with its new revision).
	UpdateLease(ctx context.Context, l Lease) (Lease, error)
	// UpdateLeases is UpdateLease for many leases in one transaction, with
	// a result per lease: a missing or conflicting lease fails only its own
	// entry. Both slices have len(ls) entries.
	UpdateLeases(ctx context.Context, ls []Lease) ([]Lease, []error)
	// GetLease returns the lease with that id.
	GetLease(ctx context.Context, id string) (Lease, error)
	// DeleteLease removes a lease and its index entries; missing is not an error.
	DeleteLease(ctx context.Context, id string) error
	// ListLeases returns leases matching f in ascending id order, and the id
	// to pass as f.After for the next page ("" when there is none).
	ListLeases(ctx context.Context, f LeaseFilter) ([]Lease, string, error)
	// ScanExpiry calls fn for each live lease (Active, Revoking,
	// RevokeFailed) in ascending order of the instant it needs attention:
	// its ExpireTime, or its EndTime when that is set and earlier (an
	// admin's revocation under way), until fn returns false.
	ScanExpiry(ctx context.Context, fn func(ExpiryEntry) bool) error
	// PurgeTombstones deletes up to limit terminal leases (Revoked, Expired)
	// whose EndTime is before the given instant, oldest first, and returns
	// how many it deleted.
	PurgeTombstones(ctx context.Context, endedBefore time.Time, limit int) (int, error)
	// Close releases the store.
	Close() error
}

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
