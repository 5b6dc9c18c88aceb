package storetest

import (
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// testIssuing: an Issuing lease (written beside CREATE ROLE, promoted to
// Active later: broker/promote.go) is a live lease like an Active one. Its
// creation deletes the intent of its id; it is in the expiry index with
// its state; a filter on Active matches it; it is promoted in place, one
// by one or in a batch, its index entry following; and it can be deleted.
func testIssuing(t *testing.T, open OpenFunc) {
	s := open(t)
	ctx := t.Context()
	a := NewLease("issuing-a", "ro", "svc", at(time.Minute))
	b := NewLease("issuing-b", "ro", "svc", at(2*time.Minute))
	a.State, b.State = broker.StateIssuing, broker.StateIssuing
	if err := s.PutIntent(ctx, broker.Intent{LeaseID: a.ID, Target: a.Target, Username: a.Username, ProxyRole: a.ProxyRole, CreateTime: T0}); err != nil {
		t.Fatal(err)
	}
	created := MustCreate(t, s, a, b)
	if in, err := s.ListIntents(ctx); err != nil || len(in) != 0 {
		t.Errorf("intents after creating the Issuing lease: %+v, %v; want none", in, err)
	}
	if got := MustGet(t, s, a.ID); got.State != broker.StateIssuing || got.Revision != created[0].Revision {
		t.Errorf("stored: %s at revision %d, want issuing at %d", got.State, got.Revision, created[0].Revision)
	}
	states := func() map[string]broker.LeaseState {
		t.Helper()
		out := map[string]broker.LeaseState{}
		if err := s.ScanExpiry(ctx, func(e broker.ExpiryEntry) bool {
			st := e.State
			if e.Username == "" { // an index without details: read the record
				st = MustGet(t, s, e.LeaseID).State
			}
			out[e.LeaseID] = st
			return true
		}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	if got := states(); got[a.ID] != broker.StateIssuing || got[b.ID] != broker.StateIssuing {
		t.Errorf("expiry index: %v, want both issuing", got)
	}
	for _, tt := range []struct {
		state broker.LeaseState
		want  int
	}{{broker.StateActive, 2}, {broker.StateIssuing, 2}, {broker.StateRevoking, 0}} {
		got, _, err := s.ListLeases(ctx, broker.LeaseFilter{State: tt.state})
		if err != nil || len(got) != tt.want {
			t.Errorf("ListLeases(state %s): %d leases (%v), want %d", tt.state, len(got), err, tt.want)
		}
	}

	// Promoted alone, and in a batch.
	pa := created[0]
	pa.State = broker.StateActive
	if _, err := s.UpdateLease(ctx, pa); err != nil {
		t.Fatalf("promote %s: %v", pa.ID, err)
	}
	pb := created[1]
	pb.State = broker.StateActive
	if _, errs := s.UpdateLeases(ctx, []broker.Lease{pb}); errs[0] != nil {
		t.Fatalf("promote %s in a batch: %v", pb.ID, errs[0])
	}
	if got := states(); got[a.ID] != broker.StateActive || got[b.ID] != broker.StateActive {
		t.Errorf("expiry index after promotion: %v, want both active", got)
	}
	if got := MustGet(t, s, b.ID); got.State != broker.StateActive || !got.ExpireTime.Equal(b.ExpireTime) {
		t.Errorf("promoted: %s expiring %v, want active expiring %v", got.State, got.ExpireTime, b.ExpireTime)
	}

	// An Issuing lease whose user was never created is deleted.
	c := NewLease("issuing-c", "ro", "svc", at(time.Minute))
	c.State = broker.StateIssuing
	MustCreate(t, s, c)
	if err := s.DeleteLease(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if _, ok := states()[c.ID]; ok {
		t.Error("a deleted Issuing lease is still in the expiry index")
	}
}
