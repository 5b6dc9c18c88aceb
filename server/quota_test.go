package server

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/fakeclock"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// listCountingStore counts the listings of the lease store.
type listCountingStore struct {
	broker.LeaseStore
	lists atomic.Int64
}

func (s *listCountingStore) ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error) {
	s.lists.Add(1)
	return s.LeaseStore.ListLeases(ctx, f)
}

// The active-lease quotas count from the store once, then follow the
// broker's issues, revocations and expiries: the counts stay right, and an
// issue no longer lists the store.
func TestQuotaCountsFollowLifecycleWithoutListing(t *testing.T) {
	ctx := testContext(t)
	clock := fakeclock.New(time.Now())
	counting := &listCountingStore{}
	h := newSecureHarness(t, secureOptions{
		tokens:  []TokenEntry{{Identity: "svc-a", SHA256: TokenHash("token-a-0123456789")}},
		allowed: map[string][]string{roleReadOnly: {"*"}, "updater": {"*"}},
		quotas:  Quotas{IdentityMaxActive: 2, RoleMaxActive: map[string]int{"updater": 1}},
		clock:   clock,
		wrapStore: func(s broker.LeaseStore) broker.LeaseStore {
			counting.LeaseStore = s
			return counting
		},
	})
	credA, _ := h.clients(t, clientCreds{token: "token-a-0123456789"})
	issue := func(role string, ttl time.Duration) (string, error) {
		t.Helper()
		req := &pb.IssueCredentialRequest{Role: role}
		if ttl > 0 {
			req.Ttl = durationpb.New(ttl)
		}
		resp, err := credA.IssueCredential(ctx, req)
		return resp.GetLease().GetId(), err
	}
	wantRefused := func(what string, err error, msg string) {
		t.Helper()
		wantCode(t, what, err, codes.ResourceExhausted)
		if got := status.Convert(err).Message(); !strings.Contains(got, msg) {
			t.Fatalf("%s: message %q, want %q", what, got, msg)
		}
	}

	// A lease from before the server counted anything (as after a
	// restart): the first quota check finds it in the store.
	before, _, err := h.broker.Issue(ctx, broker.IssueRequest{Role: roleReadOnly, Client: "svc-a"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := issue(roleReadOnly, 0); err != nil {
		t.Fatalf("second lease: %v", err)
	}
	listed := counting.lists.Load()
	if listed == 0 {
		t.Fatal("the first quota check did not read the store")
	}
	_, err = issue(roleReadOnly, 0)
	wantRefused("third lease", err, `identity "svc-a" already holds 2 active leases`)

	// A revocation frees a place.
	if _, err := credA.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: before.ID}); err != nil {
		t.Fatal(err)
	}
	short, err := issue("updater", time.Minute)
	if err != nil {
		t.Fatalf("issue after a revoke: %v", err)
	}
	_, err = issue(roleReadOnly, 0)
	wantRefused("third lease again", err, `identity "svc-a" already holds 2 active leases`)

	// So does an expiry, for the identity and for the role. The watcher
	// below is registered after the server's, so it runs after the counts
	// have changed.
	expired := make(chan struct{})
	stop := h.broker.WatchLifecycle(func(ev broker.AuditEvent) {
		if ev.Action == broker.AuditExpire && ev.LeaseID == short {
			close(expired)
		}
	})
	defer stop()
	// Far below the other leases' 10-minute TTL: only the short one expires.
	advanceUntil(t, clock, 2*time.Minute, expired, "expiry of the short lease")
	if _, err := issue("updater", 0); err != nil {
		t.Fatalf("updater lease after the other expired: %v", err)
	}
	_, err = issue(roleReadOnly, 0)
	wantRefused("third lease after the expiry", err, `identity "svc-a" already holds 2 active leases`)

	if n := counting.lists.Load(); n != listed {
		t.Errorf("issues listed the lease store %d more times after the first count; want none", n-listed)
	}
}
