package server

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// RenewLease calls in progress are bounded: past MaxPendingRenewals the
// next one answers ResourceExhausted at once instead of queueing, and a
// call that ends gives its place back.
func TestRenewLeasePendingLimit(t *testing.T) {
	h, gdb := gatedHarness(t, harnessOptions{maxPendingRenewals: 1})
	ctx := testContext(t)
	held := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease().GetId()
	other := h.issue(t, ctx, "svc-b", roleReadOnly).GetLease().GetId()

	heldErr := make(chan error, 1)
	go func() {
		_, err := h.cred.RenewLease(as(ctx, "svc-a", false), &pb.RenewLeaseRequest{LeaseId: held})
		heldErr <- err
	}()
	gdb.waitEntered(t)
	// Bounded: without the limit this call would wait for the held one.
	octx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err := h.cred.RenewLease(as(octx, "svc-b", false), &pb.RenewLeaseRequest{LeaseId: other})
	wantCode(t, "a renewal over the limit", err, codes.ResourceExhausted)
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "already renewing 1 leases") {
		t.Errorf("message %q does not say what the limit is", msg)
	}
	gdb.release()
	if err := <-heldErr; err != nil {
		t.Fatalf("the held renewal: %v", err)
	}
	if _, err := h.cred.RenewLease(as(ctx, "svc-b", false), &pb.RenewLeaseRequest{LeaseId: other}); err != nil {
		t.Fatalf("a renewal once the first ended: %v", err)
	}
}
