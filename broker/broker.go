package broker

import (
	"context"
	"time"
)

// Broker issues, renews and revokes leases. Its methods are safe for
// concurrent use.
type Broker struct {
	cfg Config
}

// New validates cfg and returns a Broker. Call Start before serving.
func New(cfg Config) (*Broker, error) { return &Broker{cfg: cfg}, nil }

// Start settles what a previous run left behind (intents, unknown
// marker-role members), rebuilds the expiry heap from the store, and starts
// the expiry manager and the periodic reconciler.
func (b *Broker) Start(ctx context.Context) error { return nil }

// Close stops the background loops and waits for them. It closes neither
// the store nor the databases.
func (b *Broker) Close() error { return nil }

// Issue creates a user for req.Role and leases it to req.Client.
func (b *Broker) Issue(ctx context.Context, req IssueRequest) (Lease, Credential, error) {
	return Lease{}, Credential{}, ErrUnavailable
}

// Renew extends a lease by increment (zero: the role's default TTL), never
// past its MaxExpireTime.
func (b *Broker) Renew(ctx context.Context, id string, increment time.Duration) (Lease, error) {
	return Lease{}, ErrUnavailable
}

// Revoke drops the lease's user, ending its sessions; it returns once the
// user is gone. Revoking a revoked or expired lease returns it unchanged.
func (b *Broker) Revoke(ctx context.Context, id string) (Lease, error) {
	return Lease{}, ErrUnavailable
}

// Lookup returns a lease.
func (b *Broker) Lookup(ctx context.Context, id string) (Lease, error) {
	return Lease{}, ErrUnavailable
}

// ListLeases lists leases matching f; see LeaseStore.ListLeases.
func (b *Broker) ListLeases(ctx context.Context, f LeaseFilter) ([]Lease, string, error) {
	return nil, "", ErrUnavailable
}

// RevokeLeases revokes every live lease the selector matches and returns
// how many it revoked.
func (b *Broker) RevokeLeases(ctx context.Context, sel RevokeSelector) (int, error) {
	return 0, ErrUnavailable
}

// Roles returns the configured roles, sorted by name.
func (b *Broker) Roles() []Role { return nil }

// Subscribe returns a channel of events for one lease; the channel holds
// at most one event, the newest. Call the returned function to unsubscribe.
func (b *Broker) Subscribe(leaseID string) (<-chan Event, func()) {
	return nil, func() {}
}

// StreamOpened and StreamClosed tell the broker that a KeepAlive stream
// started or stopped naming a lease (for revoke_on_disconnect).
func (b *Broker) StreamOpened(leaseID string) {}

// StreamClosed: see StreamOpened.
func (b *Broker) StreamClosed(leaseID string) {}

// ValidateLeaseID reports whether id has the shape of a lease id, wrapping
// ErrInvalidArgument otherwise.
func ValidateLeaseID(id string) error { return nil }
