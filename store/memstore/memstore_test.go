package memstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store/memstore"
)

// The behaviour both stores share is checked by the contract suite
// (store/storetest); these are the corners it may not reach.

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

func active(id, role string, expire time.Duration) broker.Lease {
	return broker.Lease{ID: id, Role: role, Target: "main", Username: "u_" + id, IssueTime: t0,
		ExpireTime: t0.Add(expire), MaxExpireTime: t0.Add(time.Hour), State: broker.StateActive,
		Metadata: map[string]string{"k": "v"}}
}

func TestCopiesInAndOut(t *testing.T) {
	ctx := context.Background()
	s := memstore.New()
	l := active("a", "ro", time.Minute)
	if err := s.CreateLease(ctx, &l); err != nil || l.Revision != 1 {
		t.Fatalf("CreateLease: rev %d, %v", l.Revision, err)
	}
	l.Metadata["k"] = "changed by the caller"
	got, _ := s.GetLease(ctx, "a")
	got.Metadata["k"] = "changed by a reader"
	again, _ := s.GetLease(ctx, "a")
	if again.Metadata["k"] != "v" {
		t.Errorf("stored metadata = %q, want it untouched by callers", again.Metadata["k"])
	}
	// Times come back as from a file: UTC, no monotonic reading.
	local := active("b", "ro", time.Minute)
	local.IssueTime = time.Now()
	if err := s.CreateLease(ctx, &local); err != nil {
		t.Fatal(err)
	}
	b, _ := s.GetLease(ctx, "b")
	if b.IssueTime.Location() != time.UTC || b.IssueTime != b.IssueTime.Round(0) {
		t.Errorf("issue time %v is not normalised", b.IssueTime)
	}
}

func TestLastIssuedOutlivesPurge(t *testing.T) {
	ctx := context.Background()
	s := memstore.New()
	l := active("a", "ro", time.Minute)
	if err := s.CreateLease(ctx, &l); err != nil {
		t.Fatal(err)
	}
	l.State, l.EndTime = broker.StateRevoked, t0.Add(time.Second)
	if _, err := s.UpdateLease(ctx, l); err != nil {
		t.Fatal(err)
	}
	if n, err := s.PurgeTombstones(ctx, t0.Add(time.Hour), 10); n != 1 || err != nil {
		t.Fatalf("purge: %d, %v", n, err)
	}
	got, err := s.LastIssued(ctx)
	if err != nil || !got["ro"].Equal(t0) || len(got) != 1 {
		t.Errorf("LastIssued = %v, %v; want ro at %v", got, err, t0)
	}
}

func TestClosedAndCanceled(t *testing.T) {
	s := memstore.New()
	l := active("a", "ro", time.Minute)
	if err := s.CreateLease(context.Background(), &l); err != nil {
		t.Fatal(err)
	}
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.GetLease(canceled, "a"); !errors.Is(err, context.Canceled) {
		t.Errorf("GetLease on a canceled context: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	ctx := context.Background()
	for name, err := range map[string]error{
		"GetLease":     func() error { _, err := s.GetLease(ctx, "a"); return err }(),
		"PutIntent":    s.PutIntent(ctx, broker.Intent{LeaseID: "b"}),
		"ScanExpiry":   s.ScanExpiry(ctx, func(broker.ExpiryEntry) bool { return true }),
		"LastIssued":   func() error { _, err := s.LastIssued(ctx); return err }(),
		"UpdateLeases": func() error { _, errs := s.UpdateLeases(ctx, []broker.Lease{l}); return errs[0] }(),
	} {
		if !errors.Is(err, broker.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
}
