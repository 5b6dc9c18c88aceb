package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// credentialServer implements CredentialService. KeepAlive is in
// keepalive.go.
type credentialServer struct {
	pb.UnimplementedCredentialServiceServer
	*core
}

func (s *credentialServer) IssueCredential(ctx context.Context, req *pb.IssueCredentialRequest) (*pb.IssueCredentialResponse, error) {
	id, err := identity(ctx)
	if err != nil {
		return nil, err
	}
	if req.GetRole() == "" {
		return nil, invalidArgument("role is required")
	}
	// A malformed name is the caller's mistake whoever the caller is;
	// checked first so it answers InvalidArgument, not a denial.
	if err := broker.ValidateRoleName(req.GetRole()); err != nil {
		return nil, s.fail(ctx, err)
	}
	ttl, err := durationFromProto(req.GetTtl(), "ttl")
	if err != nil {
		return nil, err
	}
	if err := s.authz.AuthorizeIssue(id, req.GetRole()); err != nil {
		return nil, s.fail(ctx, err)
	}
	// Quotas count only what authorized callers ask for: a refused caller
	// must not use up a legitimate one's allowance.
	release, err := s.quota.admit(ctx, id.Name, req.GetRole())
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	defer release()
	lease, cred, err := s.broker.Issue(ctx, broker.IssueRequest{
		Role: req.GetRole(),
		TTL:  ttl,
		// The owner is who authenticated, never what the request says:
		// ownership is what later authorizes renew and revoke.
		Client:             id.Name,
		Metadata:           req.GetMetadata(),
		RevokeOnDisconnect: req.GetRevokeOnDisconnect(),
	})
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	// The username is logged for audit (who got which PostgreSQL user);
	// the password never is.
	addLogAttrs(ctx, slog.String("lease_id", lease.ID), slog.String("username", lease.Username))
	return &pb.IssueCredentialResponse{
		Lease:      leaseToProto(lease),
		Credential: credentialToProto(cred, s.sslmode),
	}, nil
}

func (s *credentialServer) RenewLease(ctx context.Context, req *pb.RenewLeaseRequest) (*pb.RenewLeaseResponse, error) {
	inc, err := durationFromProto(req.GetIncrement(), "increment")
	if err != nil {
		return nil, err
	}
	// Renewals wait in the broker's batches; bound how many may pile up.
	done, err := s.takeRenewSlot()
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	defer done()
	if _, err := s.authorizedLease(ctx, req.GetLeaseId(), false); err != nil {
		return nil, err
	}
	l, err := s.broker.Renew(ctx, req.GetLeaseId(), inc)
	if err != nil {
		return nil, s.leaseFail(ctx, req.GetLeaseId(), err)
	}
	return &pb.RenewLeaseResponse{Lease: leaseToProto(l)}, nil
}

func (s *credentialServer) RevokeLease(ctx context.Context, req *pb.RevokeLeaseRequest) (*pb.RevokeLeaseResponse, error) {
	if _, err := s.authorizedLease(ctx, req.GetLeaseId(), false); err != nil {
		return nil, err
	}
	l, err := s.broker.Revoke(ctx, req.GetLeaseId())
	if err != nil {
		return nil, s.leaseFail(ctx, req.GetLeaseId(), err)
	}
	return &pb.RevokeLeaseResponse{Lease: leaseToProto(l)}, nil
}

func (s *credentialServer) LookupLease(ctx context.Context, req *pb.LookupLeaseRequest) (*pb.LookupLeaseResponse, error) {
	l, err := s.authorizedLease(ctx, req.GetLeaseId(), true)
	if err != nil {
		return nil, err
	}
	return &pb.LookupLeaseResponse{Lease: leaseToProto(l)}, nil
}

// authorizedLease validates a lease id, reads the lease and asks the
// Authorizer whether the caller may touch it. With fresh false the lease
// is read for its owner only (broker.LookupOwner: on etcd, no read
// through raft), and the caller must not answer from its other fields:
// renew and revoke read the lease again themselves.
//
// A caller that may not touch a lease gets exactly the answer it would get
// for a lease that does not exist (NotFound, same message): otherwise a
// non-owner holding an id, say from a log line, could learn that the
// lease exists and is live. The real reason is in the server log.
// Ownership never changes, so reading the lease first and acting on it
// next leaves no window that matters. Neither does a lease's role, which
// an in-process caller may require (WithLeaseRole) with the same answer.
func (c *core) authorizedLease(ctx context.Context, leaseID string, fresh bool) (broker.Lease, error) {
	id, err := identity(ctx)
	if err != nil {
		return broker.Lease{}, err
	}
	if err := broker.ValidateLeaseID(leaseID); err != nil {
		return broker.Lease{}, c.fail(ctx, invalidLeaseID(err))
	}
	lookup := c.broker.LookupOwner
	if fresh {
		lookup = c.broker.Lookup
	}
	l, err := lookup(ctx, leaseID)
	if err != nil {
		return broker.Lease{}, c.leaseFail(ctx, leaseID, err)
	}
	// The lease's role goes on the log line and the audit record, so that
	// usage per role counts renewals, revocations and denied attempts on
	// leases too, not only issues.
	addLogAttrs(ctx, slog.String("role", l.Role))
	if err := c.authz.AuthorizeLease(id, l); err != nil {
		addLogAttrs(ctx, slog.String("error", err.Error()))
		c.noteDenied(ctx, leaseID, l.Role)
		return broker.Lease{}, leaseNotFound(leaseID)
	}
	if role, ok := leaseRoleOf(ctx); ok && role != l.Role {
		addLogAttrs(ctx, slog.String("error", fmt.Sprintf("the lease id names role %q, the lease is of another role", role)))
		return broker.Lease{}, leaseNotFound(leaseID)
	}
	return l, nil
}

// invalidLeaseID makes sure a malformed id answers InvalidArgument even if
// the validator's error does not wrap broker.ErrInvalidArgument.
func invalidLeaseID(err error) error {
	if errors.Is(err, broker.ErrInvalidArgument) {
		return err
	}
	return fmt.Errorf("invalid lease id: %v: %w", err, broker.ErrInvalidArgument)
}

// leaseFail is fail for calls about one lease: every "not found" has the
// same wording, whoever produced it, so that a denied caller (see
// authorizedLease) cannot tell the two apart by the message either.
func (c *core) leaseFail(ctx context.Context, leaseID string, err error) error {
	if errors.Is(err, broker.ErrLeaseNotFound) {
		addLogAttrs(ctx, slog.String("error", err.Error()))
		return leaseNotFound(leaseID)
	}
	return c.fail(ctx, err)
}

func leaseNotFound(leaseID string) error {
	return status.Error(codes.NotFound, fmt.Sprintf("lease %q: %v", leaseID, broker.ErrLeaseNotFound))
}
