package server

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
)

// internalMessage is all a caller learns about an error the server does not
// recognise: its text may hold anything (a file path, a driver's detail), so
// it goes to the server log only.
const internalMessage = "internal error"

// errorCodes maps the broker's sentinel errors to gRPC codes. It is checked
// in order with errors.Is, so an error wrapping several sentinels takes the
// first listed. ErrExists has no entry on purpose: lease ids are generated
// by the broker, so a clash is the broker's bug and answers Internal.
var errorCodes = []struct {
	err  error
	code codes.Code
}{
	{broker.ErrRoleNotFound, codes.NotFound},
	{broker.ErrLeaseNotFound, codes.NotFound},
	{broker.ErrInvalidArgument, codes.InvalidArgument},
	{broker.ErrPermissionDenied, codes.PermissionDenied},
	{broker.ErrLeaseExpired, codes.FailedPrecondition},
	{broker.ErrLeaseRevoked, codes.FailedPrecondition},
	{broker.ErrMarkerOwned, codes.FailedPrecondition},
	{broker.ErrNotLeader, codes.FailedPrecondition},
	{broker.ErrResourceExhausted, codes.ResourceExhausted},
	{broker.ErrConflict, codes.Aborted},
	{broker.ErrUnavailable, codes.Unavailable},
	{broker.ErrClosed, codes.Unavailable},
}

// togRPCError is the one place that turns an error into a gRPC status
// error (after etcd's v3rpc togRPCError).
//
//   - nil stays nil;
//   - an error that already carries a status (the server's own validation)
//     passes through;
//   - a broker sentinel, possibly wrapped, keeps its message: the broker's
//     messages are written for callers and never hold a password or the
//     admin DSN;
//   - context.Canceled and context.DeadlineExceeded keep their codes. They
//     are checked after the sentinels: when the broker says "unavailable"
//     (wrapping a timeout of its own), that is the more useful answer;
//   - anything else is Internal with a generic message; the caller of
//     togRPCError logs the real error.
func togRPCError(err error) error {
	if err == nil {
		return nil
	}
	if st, ok := status.FromError(err); ok {
		return st.Err()
	}
	for _, e := range errorCodes {
		if errors.Is(err, e.err) {
			return status.Error(e.code, err.Error())
		}
	}
	switch {
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, internalMessage)
}

// invalidArgument is a shorthand for validation failures at the edge.
func invalidArgument(msg string) error {
	return status.Error(codes.InvalidArgument, msg)
}
