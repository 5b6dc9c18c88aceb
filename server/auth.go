package server

import (
	"context"
	"fmt"

	"github.com/credbroker/credbroker/broker"
)

// Identity is an authenticated caller. Name is recorded as the Client of
// the leases it is issued and decides which leases it may touch; Admin
// grants AdminService and every lease.
type Identity struct {
	Name  string
	Admin bool
}

// Authenticator establishes who is calling. It runs once per unary call and
// once per stream, before the handler. An error is answered with
// codes.Unauthenticated; its message is returned to the caller, so it must
// say what is missing without echoing a secret (a token, a certificate's
// private detail).
//
// Implementations for TLS client certificates or bearer tokens read the
// peer (google.golang.org/grpc/peer) or the incoming metadata from ctx.
type Authenticator interface {
	Authenticate(ctx context.Context) (Identity, error)
}

// LocalIdentityName is the identity LocalAuthenticator gives every caller.
const LocalIdentityName = "local"

// LocalAuthenticator trusts every caller as the admin identity "local".
//
// Trust model: it is for plaintext listeners on loopback or a unix socket
// only. Whoever can open a connection there is already a process on this
// machine (for a unix socket, one the file mode lets in), which is the
// trust boundary it relies on; it checks nothing itself. That is why
// brokerd refuses a plaintext listener on a non-loopback address: with
// this authenticator anyone on the network would be admin.
type LocalAuthenticator struct{}

// Authenticate returns the admin identity "local".
func (LocalAuthenticator) Authenticate(context.Context) (Identity, error) {
	return Identity{Name: LocalIdentityName, Admin: true}, nil
}

type identityKey struct{}

// ContextWithIdentity returns ctx carrying id. The authentication
// interceptor calls it; tests of code that reads IdentityFrom may too.
func ContextWithIdentity(ctx context.Context, id Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// IdentityFrom returns the caller's identity, put in the context by the
// authentication interceptor. ok is false when no identity was established
// (a method exempt from authentication, or a context that never passed the
// interceptor).
func IdentityFrom(ctx context.Context) (id Identity, ok bool) {
	id, ok = ctx.Value(identityKey{}).(Identity)
	return id, ok
}

// Authorizer decides what an authenticated identity may do. All
// authorization decisions of the server go through it, so that later
// policies (per-role allow-lists, read-only admins) change one type.
// Methods return nil to allow, or an error wrapping
// broker.ErrPermissionDenied to deny.
type Authorizer interface {
	// AuthorizeAdmin guards every AdminService method.
	AuthorizeAdmin(id Identity) error
	// AuthorizeIssue guards IssueCredential for a broker role.
	AuthorizeIssue(id Identity, role string) error
	// AuthorizeLease guards renewing, revoking, looking up and keeping
	// alive one existing lease.
	AuthorizeLease(id Identity, l broker.Lease) error
}

// OwnerAuthorizer is the default policy: admins may do everything; any
// authenticated identity may issue credentials for any role and may touch
// the leases issued to it (Lease.Client equals its name).
type OwnerAuthorizer struct{}

var _ Authorizer = OwnerAuthorizer{}

// AuthorizeAdmin allows admins only.
func (OwnerAuthorizer) AuthorizeAdmin(id Identity) error {
	if id.Admin {
		return nil
	}
	return fmt.Errorf("identity %q is not an admin: %w", id.Name, broker.ErrPermissionDenied)
}

// AuthorizeIssue allows every authenticated identity. The role argument is
// the seam for per-role allow-lists.
func (OwnerAuthorizer) AuthorizeIssue(id Identity, role string) error {
	if id.Name == "" {
		// An identity without a name could not be told apart from other
		// nameless callers when it comes back to renew its lease.
		return fmt.Errorf("anonymous identity: %w", broker.ErrPermissionDenied)
	}
	return nil
}

// AuthorizeLease allows admins and the lease's owner.
func (OwnerAuthorizer) AuthorizeLease(id Identity, l broker.Lease) error {
	if id.Admin || (id.Name != "" && id.Name == l.Client) {
		return nil
	}
	return fmt.Errorf("lease %q belongs to another client: %w", l.ID, broker.ErrPermissionDenied)
}
