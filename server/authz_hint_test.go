package server

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// hintingStore answers LeaseHint(s) from the store beneath without
// counting, as the etcd store answers from its cache, and counts GetLease,
// which on etcd is a read through raft. Ids in unhinted are unknown to
// the hint: a lease issued on another instance that has not reached this
// one yet.
type hintingStore struct {
	broker.LeaseStore
	gets     atomic.Int32
	mu       sync.Mutex
	unhinted map[string]bool
}

func (s *hintingStore) GetLease(ctx context.Context, id string) (broker.Lease, error) {
	s.gets.Add(1)
	return s.LeaseStore.GetLease(ctx, id)
}

func (s *hintingStore) LeaseHint(ctx context.Context, id string) (broker.Lease, error) {
	s.mu.Lock()
	unknown := s.unhinted[id]
	s.mu.Unlock()
	if unknown {
		return broker.Lease{}, broker.ErrLeaseNotFound
	}
	return s.LeaseStore.GetLease(ctx, id)
}

func (s *hintingStore) LeaseHints(ctx context.Context, ids []string) ([]broker.Lease, []error) {
	out, errs := make([]broker.Lease, len(ids)), make([]error, len(ids))
	for i, id := range ids {
		out[i], errs[i] = s.LeaseHint(ctx, id)
	}
	return out, errs
}

// RenewLease authorizes from the lease's hint (its owner never changes),
// not from a fresh read: on etcd that read was a round through raft per
// renewal, the most expensive request a renewal made. A caller that does
// not own the lease is still refused as if the lease did not exist, and a
// lease the hint does not know is read afresh before it is called
// unknown.
func TestRenewAuthorizesFromTheLeaseHint(t *testing.T) {
	hs := &hintingStore{unhinted: map[string]bool{}}
	h := newHarnessWith(t, harnessOptions{wrapStore: func(s broker.LeaseStore) broker.LeaseStore {
		hs.LeaseStore = s
		return hs
	}})
	owner := as(context.Background(), "svc", false)
	resp, err := h.cred.IssueCredential(owner, &pb.IssueCredentialRequest{Role: roleReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetLease().GetId()
	h.broker.FlushPromotions()

	hs.gets.Store(0)
	if _, err := h.cred.RenewLease(owner, &pb.RenewLeaseRequest{LeaseId: id}); err != nil {
		t.Fatalf("RenewLease by the owner: %v", err)
	}
	if n := hs.gets.Load(); n != 0 {
		t.Errorf("RenewLease read the lease %d times past its hint, want 0", n)
	}

	other := as(context.Background(), "intruder", false)
	_, err = h.cred.RenewLease(other, &pb.RenewLeaseRequest{LeaseId: id})
	wantCode(t, "RenewLease of another client's lease", err, codes.NotFound)
	_, err = h.cred.RevokeLease(other, &pb.RevokeLeaseRequest{LeaseId: id})
	wantCode(t, "RevokeLease of another client's lease", err, codes.NotFound)

	hs.mu.Lock()
	hs.unhinted[id] = true
	hs.mu.Unlock()
	hs.gets.Store(0)
	if _, err := h.cred.RenewLease(owner, &pb.RenewLeaseRequest{LeaseId: id}); err != nil {
		t.Fatalf("RenewLease of a lease the hint does not know: %v", err)
	}
	if hs.gets.Load() == 0 {
		t.Error("a lease the hint did not know was not read afresh")
	}
	if _, err := h.cred.RevokeLease(owner, &pb.RevokeLeaseRequest{LeaseId: id}); err != nil {
		t.Fatalf("RevokeLease by the owner: %v", err)
	}
	l, err := h.cred.LookupLease(owner, &pb.LookupLeaseRequest{LeaseId: id})
	if err != nil || l.GetLease().GetState() != pb.LeaseState_LEASE_STATE_REVOKED {
		t.Errorf("LookupLease after the revocation: %v, %v; want REVOKED", l.GetLease().GetState(), err)
	}
}
