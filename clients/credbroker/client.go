package credbroker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// Client talks to one broker. It is safe for concurrent use.
type Client struct {
	conn   *grpc.ClientConn
	cred   pb.CredentialServiceClient
	admin  pb.AdminServiceClient
	log    *slog.Logger
	stream *keepAliveMux

	closeOnce sync.Once
}

type options struct {
	tls       *tls.Config
	perRPC    credentials.PerRPCCredentials
	dialOpts  []grpc.DialOption
	logger    *slog.Logger
	backoff   Backoff
	tokenFile string
}

// Option configures Dial.
type Option func(*options)

// WithTLS connects with TLS (see TLSFiles). Without it the connection is
// plaintext, which Dial (like brokerd) allows only to loopback and unix
// sockets.
func WithTLS(cfg *tls.Config) Option { return func(o *options) { o.tls = cfg } }

// WithPerRPCCredentials attaches credentials (a bearer token, say) to
// every call and stream.
func WithPerRPCCredentials(c credentials.PerRPCCredentials) Option {
	return func(o *options) { o.perRPC = c }
}

// WithDialOptions appends raw gRPC dial options.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// WithLogger sets where the client logs reconnections and replacements
// (never a password). Default: discard.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithReconnectBackoff sets the KeepAlive stream's reconnection backoff.
func WithReconnectBackoff(b Backoff) Option { return func(o *options) { o.backoff = b } }

// Backoff is an exponential backoff with full jitter over its upper half.
type Backoff struct {
	Base time.Duration // default 100ms
	Max  time.Duration // default 10s
}

func (b Backoff) withDefaults() Backoff {
	if b.Base <= 0 {
		b.Base = 100 * time.Millisecond
	}
	if b.Max <= 0 {
		b.Max = 10 * time.Second
	}
	return b
}

// delay is the wait before attempt n (1-based).
func (b Backoff) delay(n int) time.Duration {
	d := b.Base
	for i := 1; i < n && d < b.Max; i++ {
		d *= 2
	}
	d = min(d, b.Max)
	return d/2 + jitter(d/2)
}

// Dial connects to the broker at addr ("host:port", or "unix:/path").
// It does not wait for the connection: the first call does.
func Dial(addr string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if o.logger == nil {
		o.logger = slog.New(slog.DiscardHandler)
	}
	dial := []grpc.DialOption{}
	if o.tls != nil {
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(o.tls)))
	} else {
		if err := checkPlaintext(addr); err != nil {
			return nil, err
		}
		dial = append(dial, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if o.perRPC != nil {
		dial = append(dial, grpc.WithPerRPCCredentials(o.perRPC))
	}
	if o.tokenFile != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearerFile{path: o.tokenFile, secure: o.tls != nil}))
	}
	dial = append(dial, o.dialOpts...)
	conn, err := grpc.NewClient(addr, dial...)
	if err != nil {
		return nil, fmt.Errorf("credbroker: dial %s: %w", addr, err)
	}
	c := &Client{
		conn:  conn,
		cred:  pb.NewCredentialServiceClient(conn),
		admin: pb.NewAdminServiceClient(conn),
		log:   o.logger,
	}
	c.stream = newKeepAliveMux(c, o.backoff.withDefaults())
	return c, nil
}

// Close ends the KeepAlive stream and the connection. Keepers stop
// renewing; their leases run out unless revoked.
func (c *Client) Close() error {
	var err error
	c.closeOnce.Do(func() {
		c.stream.close()
		err = c.conn.Close()
	})
	return err
}

// Conn is the underlying connection, for services this package does not wrap.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// IssueRequest asks for a credential.
type IssueRequest struct {
	Role string
	// TTL: zero is the role's default; above its max is capped.
	TTL      time.Duration
	Metadata map[string]string
	// RevokeOnDisconnect binds the lease to KeepAlive streams: when none
	// names it for the broker's grace period, it is revoked.
	RevokeOnDisconnect bool
}

// Issue asks for a new credential.
func (c *Client) Issue(ctx context.Context, req IssueRequest) (Lease, Credential, error) {
	resp, err := c.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{
		Role:               req.Role,
		Ttl:                durationOrNil(req.TTL),
		Metadata:           req.Metadata,
		RevokeOnDisconnect: req.RevokeOnDisconnect,
	})
	if err != nil {
		return Lease{}, Credential{}, err
	}
	return leaseFromProto(resp.GetLease()), credentialFromProto(resp.GetCredential()), nil
}

// Renew extends a lease by increment (zero: the role's default TTL).
func (c *Client) Renew(ctx context.Context, leaseID string, increment time.Duration) (Lease, error) {
	resp, err := c.cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: leaseID, Increment: durationOrNil(increment)})
	if err != nil {
		return Lease{}, err
	}
	return leaseFromProto(resp.GetLease()), nil
}

// Revoke drops the lease's user and ends its sessions; it returns once
// the user is gone.
func (c *Client) Revoke(ctx context.Context, leaseID string) (Lease, error) {
	resp, err := c.cred.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: leaseID})
	if err != nil {
		return Lease{}, err
	}
	return leaseFromProto(resp.GetLease()), nil
}

// Lookup returns a lease.
func (c *Client) Lookup(ctx context.Context, leaseID string) (Lease, error) {
	resp, err := c.cred.LookupLease(ctx, &pb.LookupLeaseRequest{LeaseId: leaseID})
	if err != nil {
		return Lease{}, err
	}
	return leaseFromProto(resp.GetLease()), nil
}

// LeaseFilter selects leases for ListLeases. Empty fields match all.
type LeaseFilter struct {
	Role, Client string
	State        LeaseState
	PageSize     int
	PageToken    string
}

// ListLeases lists one page of leases (admin). The second result is the
// token of the next page, "" at the end.
func (c *Client) ListLeases(ctx context.Context, f LeaseFilter) ([]Lease, string, error) {
	resp, err := c.admin.ListLeases(ctx, &pb.ListLeasesRequest{
		Role: f.Role, Client: f.Client, State: pb.LeaseState(f.State),
		PageSize: int32(f.PageSize), PageToken: f.PageToken,
	})
	if err != nil {
		return nil, "", err
	}
	out := make([]Lease, 0, len(resp.GetLeases()))
	for _, l := range resp.GetLeases() {
		out = append(out, leaseFromProto(l))
	}
	return out, resp.GetNextPageToken(), nil
}

// RevokeSelector selects leases for RevokeLeases; at least one field is
// required, several are combined with AND.
type RevokeSelector struct {
	LeaseIDs     []string
	Role, Client string
}

// RevokeLeases revokes every lease the selector matches (admin) and
// returns how many it revoked.
func (c *Client) RevokeLeases(ctx context.Context, sel RevokeSelector) (int, error) {
	if len(sel.LeaseIDs) == 0 && sel.Role == "" && sel.Client == "" {
		// The server refuses too; saying so here saves a round trip and
		// makes "revoke everything" impossible to send by accident.
		return 0, errors.New("credbroker: RevokeLeases needs lease ids, a role or a client")
	}
	resp, err := c.admin.RevokeLeases(ctx, &pb.RevokeLeasesRequest{LeaseIds: sel.LeaseIDs, Role: sel.Role, Client: sel.Client})
	if err != nil {
		return 0, err
	}
	return int(resp.GetRevokedCount()), nil
}

// Role is a broker role as the broker describes it.
type Role struct {
	Name, Target, ProxyRole, Database string
	DefaultTTL, MaxTTL                time.Duration
}

// ListRoles lists the broker's roles (admin).
func (c *Client) ListRoles(ctx context.Context) ([]Role, error) {
	resp, err := c.admin.ListRoles(ctx, &pb.ListRolesRequest{})
	if err != nil {
		return nil, err
	}
	out := make([]Role, 0, len(resp.GetRoles()))
	for _, r := range resp.GetRoles() {
		out = append(out, Role{
			Name: r.GetName(), Target: r.GetTarget(), ProxyRole: r.GetProxyRole(), Database: r.GetDatabase(),
			DefaultTTL: r.GetDefaultTtl().AsDuration(), MaxTTL: r.GetMaxTtl().AsDuration(),
		})
	}
	return out, nil
}

func durationOrNil(d time.Duration) *durationpb.Duration {
	if d == 0 {
		return nil
	}
	return durationpb.New(d)
}
