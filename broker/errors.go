package broker

import "errors"

// Sentinel errors of the domain. server/ maps them to gRPC status codes with
// errors.Is; wrap them with fmt.Errorf("...: %w", ErrX) to add context.
var (
	// ErrRoleNotFound: no broker role of that name.
	ErrRoleNotFound = errors.New("role not found")
	// ErrLeaseNotFound: no lease with that id.
	ErrLeaseNotFound = errors.New("lease not found")
	// ErrLeaseExpired: the lease expired; it cannot be renewed.
	ErrLeaseExpired = errors.New("lease expired")
	// ErrLeaseRevoked: the lease was revoked (or is being revoked); it cannot be renewed.
	ErrLeaseRevoked = errors.New("lease revoked")
	// ErrInvalidArgument: the request is malformed (bad TTL, bad id, bad metadata...).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrPermissionDenied: the caller may not do this.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrUnavailable: the database (or another dependency) cannot be reached.
	ErrUnavailable = errors.New("unavailable")
	// ErrConflict: a compare-and-set write lost against a concurrent writer.
	ErrConflict = errors.New("concurrent update")
	// ErrExists: a record with that key already exists.
	ErrExists = errors.New("already exists")
	// ErrClosed: the broker or store is shut down.
	ErrClosed = errors.New("closed")
	// ErrUserNotFound: the lease's database user is gone (dropped outside
	// the broker); Database.RenewUser returns it.
	ErrUserNotFound = errors.New("database user does not exist")
	// ErrUnknownOutcome: a store write whose outcome is unknown: it may
	// have committed or not (a timeout on a networked store). The caller
	// re-reads before it acts on either (see LeaseStore).
	ErrUnknownOutcome = errors.New("write outcome unknown")
	// ErrMarkerOwned: a target's marker role belongs to another broker
	// group (MarkerClaimer); this group must not issue into it or sweep it.
	ErrMarkerOwned = errors.New("marker role owned by another broker group")
	// ErrResourceExhausted: a quota or rate limit was hit.
	ErrResourceExhausted = errors.New("resource exhausted")
)
