package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// rotatorFunc is a RootRotator made of a function; the real one
// (rootcred.Credentials) is tested end to end in server/rootcred and
// cmd/brokerctl.
type rotatorFunc func(ctx context.Context, target string) (RootRotation, error)

func (f rotatorFunc) RotateRoot(ctx context.Context, target string) (RootRotation, error) {
	return f(ctx, target)
}

func TestRotateRootCredentialStatus(t *testing.T) {
	at := time.Date(2026, 11, 25, 22, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		rotator RootRotator
		target  string
		code    codes.Code
		msg     string
	}{
		{"no rotator", nil, "main", codes.Unimplemented, "does not rotate"},
		{"no target", rotatorFunc(nil), "", codes.InvalidArgument, "target is required"},
		{"long target", rotatorFunc(nil), strings.Repeat("x", 64), codes.InvalidArgument, "not a target name"},
		{"invalid UTF-8", rotatorFunc(nil), "\xff", codes.InvalidArgument, "not a target name"},
		{"unknown target", rotatorFunc(func(context.Context, string) (RootRotation, error) {
			return RootRotation{}, fmt.Errorf("%w %q", ErrUnknownTarget, "nope")
		}), "nope", codes.NotFound, `unknown target "nope"`},
		{"env password", rotatorFunc(func(context.Context, string) (RootRotation, error) {
			return RootRotation{}, fmt.Errorf("%w: it comes from an environment variable", ErrRotationNotSupported)
		}), "main", codes.FailedPrecondition, "environment variable"},
		{"database down", rotatorFunc(func(context.Context, string) (RootRotation, error) {
			return RootRotation{}, fmt.Errorf("setting the new admin password: %w: dial tcp", broker.ErrUnavailable)
		}), "main", codes.Unavailable, "unavailable"},
		{"other failure", rotatorFunc(func(context.Context, string) (RootRotation, error) {
			return RootRotation{}, errors.New("storing it at file /etc/credbroker/secret-path failed")
		}), "main", codes.Internal, `target "main" failed; brokerd's log has the details`},
		{"ok", rotatorFunc(func(_ context.Context, target string) (RootRotation, error) {
			return RootRotation{Target: target, Source: "file /etc/pw", Time: at}, nil
		}), "main", codes.OK, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &adminServer{core: &core{rotator: tc.rotator, log: discardLogger()}}
			resp, err := s.RotateRootCredential(context.Background(), &pb.RotateRootCredentialRequest{Target: tc.target})
			if got := status.Code(err); got != tc.code {
				t.Fatalf("code %v (%v), want %v", got, err, tc.code)
			}
			if err != nil {
				if msg := status.Convert(err).Message(); !strings.Contains(msg, tc.msg) || strings.Contains(msg, "secret-path") {
					t.Errorf("message %q, want it to contain %q and no internal detail", msg, tc.msg)
				}
				return
			}
			if resp.GetTarget() != "main" || resp.GetSource() != "file /etc/pw" || !resp.GetRotateTime().AsTime().Equal(at) {
				t.Errorf("response %v", resp)
			}
		})
	}
}
