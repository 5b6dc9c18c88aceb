package etcd_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/storetest"
)

// queueBehindHeldCommit starts first (a write that the committer sends and
// holds), then the writes of rest concurrently, and returns once they all
// wait behind it; release lets them go, wait waits for every write.
func queueBehindHeldCommit(t *testing.T, s *etcd.Store, first func() error, rest []func() error) (release func(), wait func() []error) {
	t.Helper()
	entered, release := etcd.HoldGroupCommit()
	t.Cleanup(release)
	errs := make([]error, len(rest)+1)
	var wg sync.WaitGroup
	wg.Go(func() { errs[0] = first() })
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first write never reached the committer")
	}
	for i, f := range rest {
		wg.Go(func() { errs[i+1] = f() })
	}
	deadline := time.Now().Add(10 * time.Second)
	for etcd.PendingGroup(s) < len(rest) {
		if time.Now().After(deadline) {
			t.Fatalf("%d writes queued, want %d", etcd.PendingGroup(s), len(rest))
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	return release, func() []error { wg.Wait(); return errs }
}

// Concurrent intents and creates share one Txn; each create deletes its
// intent, is indexed and moves its role's last issue time to the latest.
func TestGroupCommitMergesConcurrentWrites(t *testing.T) {
	s := openStore(t)
	const n = 20 // 20 creates: 60 operations plus the role's, in one Txn
	var leases []broker.Lease
	for i := range n {
		l := storetest.NewLease(fmt.Sprintf("g%02d", i), "ro", "svc", at(time.Hour+time.Duration(i)*time.Second))
		l.IssueTime = at(time.Duration(i) * time.Minute)
		leases = append(leases, l)
		if err := s.PutIntent(t.Context(), broker.Intent{LeaseID: l.ID, Target: l.Target, Username: l.Username, ProxyRole: l.ProxyRole}); err != nil {
			t.Fatal(err)
		}
	}
	var creates []func() error
	for i := range leases {
		creates = append(creates, func() error { return s.CreateLease(t.Context(), &leases[i]) })
	}
	before := etcd.Writes(s)
	release, wait := queueBehindHeldCommit(t, s,
		func() error {
			return s.PutIntent(t.Context(), broker.Intent{LeaseID: "other", Target: "main", Username: "u_other", ProxyRole: "p"})
		}, creates)
	release()
	for i, err := range wait() {
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if w := etcd.Writes(s) - before; w != 2 {
		t.Errorf("%d Txns for one intent and %d concurrent creates, want 2 (the intent, then the creates together)", w, n)
	}
	idx := expiryIDs(t, s)
	for _, l := range leases {
		if l.Revision == 0 || l.Revision != leases[0].Revision {
			t.Errorf("lease %s at revision %d, want the shared Txn's %d", l.ID, l.Revision, leases[0].Revision)
		}
		storetest.MustGet(t, s, l.ID)
		if !idx[l.ID].Equal(l.ExpireTime) {
			t.Errorf("lease %s in the expiry index at %v, want %v", l.ID, idx[l.ID], l.ExpireTime)
		}
	}
	intents, err := s.ListIntents(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(intents) != 1 || intents[0].LeaseID != "other" {
		t.Errorf("intents %+v, want only the one of \"other\"", intents)
	}
	last, err := s.LastIssued(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if want := leases[n-1].IssueTime; !last["ro"].Equal(want) {
		t.Errorf("last issue of ro %v, want the latest, %v", last["ro"], want)
	}
}

// A merged Txn whose compare fails (one id exists) writes nothing; every
// entry is then committed alone, and only the taken id fails.
func TestGroupCommitFallsBackAlone(t *testing.T) {
	s := openStore(t)
	taken := storetest.MustCreate(t, s, storetest.NewLease("taken", "ro", "svc", at(time.Hour)))[0]
	dup := storetest.NewLease("taken", "ro", "other-client", at(2*time.Hour))
	var leases []broker.Lease
	for i := range 5 {
		leases = append(leases, storetest.NewLease(fmt.Sprintf("f%d", i), "ro", "svc", at(time.Hour)))
	}
	creates := []func() error{func() error { return s.CreateLease(t.Context(), &dup) }}
	for i := range leases {
		creates = append(creates, func() error { return s.CreateLease(t.Context(), &leases[i]) })
	}
	release, wait := queueBehindHeldCommit(t, s,
		func() error {
			return s.PutIntent(t.Context(), broker.Intent{LeaseID: "x", Target: "main", Username: "u_x", ProxyRole: "p"})
		}, creates)
	release()
	errs := wait()
	if !errors.Is(errs[1], broker.ErrExists) {
		t.Errorf("create of a taken id: %v, want ErrExists", errs[1])
	}
	for i, err := range errs {
		if i != 1 && err != nil {
			t.Errorf("write %d: %v", i, err)
		}
	}
	if got := storetest.MustGet(t, s, "taken"); got.Client != taken.Client || got.Revision != taken.Revision {
		t.Errorf("the taken lease changed: %+v", got)
	}
	for _, l := range leases {
		if got := storetest.MustGet(t, s, l.ID); got.Revision != l.Revision {
			t.Errorf("lease %s at revision %d, create said %d", l.ID, got.Revision, l.Revision)
		}
	}
}
