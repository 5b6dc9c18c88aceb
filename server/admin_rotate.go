package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// RootRotator rotates the broker's own admin password on a target and
// stores it back at its source (rootcred.Credentials).
type RootRotator interface {
	RotateRoot(ctx context.Context, target string) (RootRotation, error)
}

// RootRotation says what a rotation did. It never holds the password.
type RootRotation struct {
	Target string
	// Source is where the new password was stored ("file /path", "vault ...").
	Source string
	Time   time.Time
}

// Errors a RootRotator returns for what the caller got wrong.
var (
	// ErrUnknownTarget: no target of that name (NotFound).
	ErrUnknownTarget = errors.New("unknown target")
	// ErrRotationNotSupported: the target's password source cannot be
	// written, e.g. an environment variable (FailedPrecondition).
	ErrRotationNotSupported = errors.New("the admin password cannot be rotated")
)

func (s *adminServer) RotateRootCredential(ctx context.Context, req *pb.RotateRootCredentialRequest) (*pb.RotateRootCredentialResponse, error) {
	if s.rotator == nil {
		return nil, status.Error(codes.Unimplemented, "this broker does not rotate admin passwords")
	}
	switch t := req.GetTarget(); {
	case t == "":
		return nil, invalidArgument("target is required")
	case len(t) > 63 || !utf8.ValidString(t):
		// Target names are at most 63 bytes (config.targetNamePattern).
		return nil, invalidArgument("target is not a target name")
	}
	addLogAttrs(ctx, slog.String("target", req.GetTarget()))
	res, err := s.rotator.RotateRoot(ctx, req.GetTarget())
	switch {
	case err == nil:
	case errors.Is(err, ErrUnknownTarget):
		return nil, status.Error(codes.NotFound, err.Error())
	case errors.Is(err, ErrRotationNotSupported):
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	default:
		if st := s.fail(ctx, err); status.Code(st) != codes.Internal {
			return nil, st
		}
		// The detail (which step failed, where the pending password is
		// recorded) is in brokerd's log; it never holds the password.
		return nil, status.Error(codes.Internal, fmt.Sprintf("rotating the admin password of target %q failed; brokerd's log has the details", req.GetTarget()))
	}
	return &pb.RotateRootCredentialResponse{
		Target: res.Target, Source: res.Source, RotateTime: timestamppb.New(res.Time),
	}, nil
}
