package server

import (
	"context"
	"fmt"
	"math"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"

	"github.com/credbroker/credbroker/broker"
)

// Page sizes of ListLeases.
const (
	defaultPageSize = 100
	maxPageSize     = 1000
)

// adminServer implements AdminService. The authentication interceptor has
// already checked that the caller is an admin (Authorizer.AuthorizeAdmin).
type adminServer struct {
	pb.UnimplementedAdminServiceServer
	*core
}

func (s *adminServer) ListLeases(ctx context.Context, req *pb.ListLeasesRequest) (*pb.ListLeasesResponse, error) {
	state, ok := stateFromProto(req.GetState())
	if !ok {
		return nil, invalidArgument(fmt.Sprintf("invalid state %d", int32(req.GetState())))
	}
	size := int(req.GetPageSize())
	switch {
	case size < 0:
		return nil, invalidArgument("page_size must not be negative")
	case size == 0:
		size = defaultPageSize
	case size > maxPageSize:
		size = maxPageSize
	}
	after, err := decodePageToken(req.GetPageToken())
	if err != nil {
		return nil, err
	}
	if err := validateSelectors(req.GetRole(), req.GetClient()); err != nil {
		return nil, err
	}
	leases, next, err := s.broker.ListLeases(ctx, broker.LeaseFilter{
		Role:   req.GetRole(),
		Client: req.GetClient(),
		State:  state,
		Limit:  size,
		After:  after,
	})
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	out := &pb.ListLeasesResponse{
		Leases:        make([]*pb.Lease, 0, len(leases)),
		NextPageToken: encodePageToken(next),
	}
	for _, l := range leases {
		out.Leases = append(out.Leases, leaseToProto(l))
	}
	return out, nil
}

func (s *adminServer) RevokeLeases(ctx context.Context, req *pb.RevokeLeasesRequest) (*pb.RevokeLeasesResponse, error) {
	// An empty selector must never mean "everything": one mistyped flag in
	// a script would drop every user the broker made.
	if len(req.GetLeaseIds()) == 0 && req.GetRole() == "" && req.GetClient() == "" {
		return nil, invalidArgument("at least one of lease_ids, role, client is required")
	}
	for _, id := range req.GetLeaseIds() {
		if err := broker.ValidateLeaseID(id); err != nil {
			return nil, s.fail(ctx, invalidLeaseID(err))
		}
	}
	if err := validateSelectors(req.GetRole(), req.GetClient()); err != nil {
		return nil, err
	}
	n, err := s.broker.RevokeLeases(ctx, broker.RevokeSelector{
		IDs:    req.GetLeaseIds(),
		Role:   req.GetRole(),
		Client: req.GetClient(),
	})
	if err != nil {
		// Some leases may have been revoked before the error; the broker's
		// message says so if it knows. Revoking again is idempotent.
		return nil, s.fail(ctx, err)
	}
	if n > math.MaxInt32 {
		n = math.MaxInt32
	}
	return &pb.RevokeLeasesResponse{RevokedCount: int32(n)}, nil
}

func (s *adminServer) ListRoles(ctx context.Context, _ *pb.ListRolesRequest) (*pb.ListRolesResponse, error) {
	roles := s.broker.Roles()
	out := &pb.ListRolesResponse{Roles: make([]*pb.Role, 0, len(roles))}
	for _, r := range roles {
		out.Roles = append(out.Roles, roleToProto(r, s.endpoints))
	}
	return out, nil
}

// validateSelectors checks the role and client filters of ListLeases and
// RevokeLeases. A malformed one can match no lease, so answering
// InvalidArgument instead of an empty result tells a script with a quoting
// bug about it rather than letting it conclude there is nothing to revoke.
// Messages do not echo the value.
func validateSelectors(role, client string) error {
	if role != "" {
		if err := broker.ValidateRoleName(role); err != nil {
			return invalidArgument(err.Error())
		}
	}
	if client != "" {
		if err := ValidateIdentity(client); err != nil {
			return invalidArgument("client: " + err.Error())
		}
	}
	return nil
}
