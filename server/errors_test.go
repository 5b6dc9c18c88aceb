package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
)

func TestTogRPCError(t *testing.T) {
	if err := togRPCError(nil); err != nil {
		t.Fatalf("togRPCError(nil) = %v, want nil", err)
	}

	sentinels := []struct {
		err  error
		code codes.Code
	}{
		{broker.ErrRoleNotFound, codes.NotFound},
		{broker.ErrLeaseNotFound, codes.NotFound},
		{broker.ErrInvalidArgument, codes.InvalidArgument},
		{broker.ErrPermissionDenied, codes.PermissionDenied},
		{broker.ErrUnavailable, codes.Unavailable},
		{broker.ErrLeaseExpired, codes.FailedPrecondition},
		{broker.ErrLeaseRevoked, codes.FailedPrecondition},
		{broker.ErrMarkerOwned, codes.FailedPrecondition},
		{broker.ErrResourceExhausted, codes.ResourceExhausted},
		{broker.ErrConflict, codes.Aborted},
		{broker.ErrClosed, codes.Unavailable},
		{context.Canceled, codes.Canceled},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
	}
	for _, tc := range sentinels {
		for _, err := range []error{
			tc.err,
			fmt.Errorf("lease abc: %w", tc.err),
			fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", tc.err)),
			errors.Join(errors.New("other"), tc.err),
		} {
			t.Run(err.Error(), func(t *testing.T) {
				got := togRPCError(err)
				st, ok := status.FromError(got)
				if !ok {
					t.Fatalf("togRPCError(%v) = %v, not a status", err, got)
				}
				if st.Code() != tc.code {
					t.Errorf("code = %v, want %v", st.Code(), tc.code)
				}
				// Domain messages are written for callers: kept whole.
				if st.Message() != err.Error() {
					t.Errorf("message = %q, want %q", st.Message(), err.Error())
				}
			})
		}
	}

	t.Run("sentinel wins over context error", func(t *testing.T) {
		err := fmt.Errorf("connect: %w (%w)", broker.ErrUnavailable, context.DeadlineExceeded)
		if got := status.Code(togRPCError(err)); got != codes.Unavailable {
			t.Errorf("code = %v, want Unavailable", got)
		}
	})

	t.Run("unknown errors are Internal with a generic message", func(t *testing.T) {
		for _, err := range []error{
			errors.New("open /var/lib/credbroker/leases.db: secret detail"),
			fmt.Errorf("wrapped: %w", errors.New("password=hunter2")),
			// ErrExists has no mapping: lease ids are the broker's, a clash is its bug.
			fmt.Errorf("lease x: %w", broker.ErrExists),
		} {
			st := status.Convert(togRPCError(err))
			if st.Code() != codes.Internal {
				t.Errorf("%v: code = %v, want Internal", err, st.Code())
			}
			if st.Message() != internalMessage {
				t.Errorf("%v: message = %q, want %q", err, st.Message(), internalMessage)
			}
		}
	})

	t.Run("status errors pass through", func(t *testing.T) {
		in := status.Error(codes.InvalidArgument, "page_size must not be negative")
		st := status.Convert(togRPCError(in))
		if st.Code() != codes.InvalidArgument || st.Message() != "page_size must not be negative" {
			t.Errorf("got %v %q", st.Code(), st.Message())
		}
		wrapped := fmt.Errorf("context: %w", status.Error(codes.PermissionDenied, "no"))
		if got := status.Code(togRPCError(wrapped)); got != codes.PermissionDenied {
			t.Errorf("wrapped status: code = %v, want PermissionDenied", got)
		}
	})
}

func TestStatusTextNeverLeaksUnknownErrors(t *testing.T) {
	got := statusText(errors.New("dial tcp 10.0.0.1:5432: password authentication failed for hunter2"))
	if strings.Contains(got, "hunter2") || got != "Internal: internal error" {
		t.Errorf("statusText = %q", got)
	}
	if got := statusText(fmt.Errorf("renew user: %w", broker.ErrUnavailable)); got != "Unavailable: renew user: unavailable" {
		t.Errorf("statusText = %q", got)
	}
}
