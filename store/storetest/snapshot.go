package storetest

import (
	"bytes"
	"context"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// RestoreFunc returns a new store restored from what Snapshot wrote (and
// should close it in t.Cleanup).
type RestoreFunc func(t *testing.T, snapshot []byte) broker.LeaseStore

// RunSnapshot checks Snapshot: a store restored from it holds exactly
// what the store held when it was taken (leases, tombstones and their
// indexes, intents, the group, the roles' last issue times), and nothing
// written after. Run it, besides Run, on every backend with its restore.
func RunSnapshot(t *testing.T, open OpenFunc, restore RestoreFunc) {
	t.Helper()
	t.Run("Snapshot", func(t *testing.T) { testSnapshot(t, open, restore) })
}

func testSnapshot(t *testing.T, open OpenFunc, restore RestoreFunc) {
	s := open(t)
	ctx := t.Context()
	leases := MustCreate(t, s,
		NewLease("a", "ro", "svc", at(2*time.Minute)),
		NewLease("b", "rw", "ops", at(1*time.Minute)),
	)
	leases[1] = MustUpdate(t, s, ended(leases[1], broker.StateRevoked, at(time.Minute)))
	group, err := s.GroupID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	in := broker.Intent{LeaseID: "d", Target: "main", Username: "cb_d", ProxyRole: "ro_role", CreateTime: at(0), Group: group}
	if err := s.PutIntent(ctx, in); err != nil {
		t.Fatal(err)
	}
	var lastIssued map[string]time.Time
	if r, ok := s.(broker.LastIssuedReader); ok {
		if lastIssued, err = r.LastIssued(ctx); err != nil {
			t.Fatal(err)
		}
	}

	var buf bytes.Buffer
	n, err := s.Snapshot(ctx, &buf)
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if n != int64(buf.Len()) || n == 0 {
		t.Errorf("Snapshot returned %d bytes, wrote %d", n, buf.Len())
	}
	// Writes after the snapshot are not in it.
	later := NewLease("c", "ro", "svc", at(3*time.Minute))
	later.IssueTime = at(time.Minute)
	MustCreate(t, s, later)
	MustUpdate(t, s, ended(MustGet(t, s, "a"), broker.StateRevoked, at(30*time.Second)))
	if err := s.DeleteIntent(ctx, "d"); err != nil {
		t.Fatal(err)
	}

	r := restore(t, buf.Bytes())
	if got, err := r.GroupID(ctx); err != nil || got != group {
		t.Errorf("GroupID of the restored store = %q, %v; want %q", got, err, group)
	}
	for _, want := range leases {
		assertSameButRevision(t, MustGet(t, r, want.ID), want)
	}
	if got := IDs(listAll(t, r)); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("ListLeases of the restored store = %q, want a and b", got)
	}
	got := ScanExpiry(t, r)
	if len(got) != 1 || got[0].LeaseID != "a" {
		t.Fatalf("ScanExpiry of the restored store = %+v, want lease a only", got)
	}
	intents, err := r.ListIntents(ctx)
	if err == nil && len(intents) == 1 {
		intents[0].CreateTime = normalizeTime(intents[0].CreateTime)
	}
	if err != nil || !reflect.DeepEqual(intents, []broker.Intent{in}) {
		t.Errorf("ListIntents of the restored store = %+v, %v; want %+v", intents, err, in)
	}
	if lr, ok := r.(broker.LastIssuedReader); ok && lastIssued != nil {
		li, err := lr.LastIssued(ctx)
		if err != nil || len(li) != len(lastIssued) {
			t.Errorf("LastIssued of the restored store = %v, %v; want %v", li, err, lastIssued)
		}
		for role, want := range lastIssued {
			if !li[role].Equal(want) {
				t.Errorf("LastIssued[%s] of the restored store = %v, want %v", role, li[role], want)
			}
		}
	}
	// The tombstone is indexed for the purge.
	if n, err := r.PurgeTombstones(ctx, at(time.Hour), 10); err != nil || n != 1 {
		t.Errorf("PurgeTombstones of the restored store = %d, %v; want 1", n, err)
	}
	// A restored store takes writes.
	MustUpdate(t, r, MustGet(t, r, "a"))

	done, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Snapshot(done, &bytes.Buffer{}); err == nil {
		t.Error("Snapshot with a canceled context succeeded")
	}
	_ = s.Close()
	if _, err := s.Snapshot(ctx, &bytes.Buffer{}); err == nil {
		t.Error("Snapshot after Close succeeded")
	}
}
