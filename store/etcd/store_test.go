package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/storetest"
)

// What the contract suite cannot see: etcd's limits (128 operations and
// 1.5 MiB per Txn), the Txn that fails as a whole and is retried without
// its losers, scans whose revision is compacted, timeouts, and the group
// id.

func at(d time.Duration) time.Time { return storetest.T0.Add(d) }

func createN(t *testing.T, s broker.LeaseStore, n int, mutate func(l *broker.Lease)) []broker.Lease {
	t.Helper()
	var in []broker.Lease
	for i := range n {
		l := storetest.NewLease(fmt.Sprintf("l%03d", i), "ro", "svc", at(time.Duration(i)*time.Second))
		if mutate != nil {
			mutate(&l)
		}
		in = append(in, l)
	}
	return storetest.MustCreate(t, s, in...)
}

// A batch larger than one Txn is committed in several; a lease another
// writer changed between the read and the commit fails its own entry
// only, and the rest of its group is committed on the retry.
func TestUpdateLeasesSplitsAndRetries(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	s := openAt(t, eps, prefix)
	other := openAt(t, eps, prefix)
	leases := createN(t, s, 100, nil)

	in := make([]broker.Lease, len(leases))
	for i, l := range leases {
		l.ExpireTime = at(time.Hour + time.Duration(i)*time.Second)
		in[i] = l
	}
	in[10].Revision++ // stale from the start
	raced := leases[50]
	var fired atomic.Bool // the hook is global: other's update runs it too
	restore := etcd.SetUpdateReadHook(func() {
		if fired.CompareAndSwap(false, true) {
			l := raced
			l.LastError = "changed by another broker"
			storetest.MustUpdate(t, other, l)
		}
	})
	defer restore()
	got, errs := s.UpdateLeases(t.Context(), in)
	restore()
	for i := range in {
		switch i {
		case 10, 50:
			if !errors.Is(errs[i], broker.ErrConflict) {
				t.Errorf("entry %d: %v, want ErrConflict", i, errs[i])
			}
		default:
			if errs[i] != nil {
				t.Errorf("entry %d: %v", i, errs[i])
				continue
			}
			if got[i].Revision <= leases[i].Revision || !got[i].ExpireTime.Equal(in[i].ExpireTime) {
				t.Errorf("entry %d: %+v", i, got[i])
			}
		}
	}
	if l := storetest.MustGet(t, s, raced.ID); l.LastError != "changed by another broker" {
		t.Errorf("the other broker's update was overwritten: %+v", l)
	}
	if n := len(storetest.ScanExpiry(t, s)); n != 100 {
		t.Errorf("%d expiry entries, want 100", n)
	}
}

// Leases whose records together exceed an etcd request are committed in
// Txns of their own; one that alone exceeds it is refused, not an unknown
// outcome.
func TestRequestSize(t *testing.T) {
	s := openStore(t)
	big := strings.Repeat("x", 600<<10)
	leases := createN(t, s, 3, func(l *broker.Lease) { l.Metadata = map[string]string{"big": big} })
	for i := range leases {
		leases[i].ExpireTime = at(time.Hour)
	}
	_, errs := s.UpdateLeases(t.Context(), leases)
	for i, err := range errs {
		if err != nil {
			t.Errorf("entry %d: %v", i, err)
		}
	}

	huge := storetest.NewLease("huge", "ro", "svc", at(time.Minute))
	huge.Metadata = map[string]string{"huge": strings.Repeat("x", 1600<<10)}
	err := s.CreateLease(t.Context(), &huge)
	if err == nil || errors.Is(err, broker.ErrUnknownOutcome) {
		t.Fatalf("CreateLease of a 1.6 MiB lease: %v, want a refusal", err)
	}
	if _, err := s.GetLease(t.Context(), "huge"); !errors.Is(err, broker.ErrLeaseNotFound) {
		t.Errorf("GetLease after the refused create: %v", err)
	}
}

// More tombstones than one Txn deletes are purged in several.
func TestPurgeTombstonesBatches(t *testing.T) {
	s := openStore(t)
	createN(t, s, 150, func(l *broker.Lease) { l.State, l.EndTime = broker.StateExpired, l.ExpireTime })
	n, err := s.PurgeTombstones(t.Context(), at(time.Hour), 140)
	if err != nil || n != 140 {
		t.Fatalf("PurgeTombstones = %d, %v; want 140", n, err)
	}
	left, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{})
	if err != nil {
		t.Fatal(err)
	}
	// The oldest went first.
	if got, want := storetest.IDs(left), []string{"l140", "l141", "l142", "l143", "l144", "l145", "l146", "l147", "l148", "l149"}; !slices.Equal(got, want) {
		t.Errorf("left %q, want %q", got, want)
	}
}

// A scan whose revision is compacted between two of its range reads
// starts again, at a newer revision: its result is still one snapshot.
func TestScanRestartsAfterCompaction(t *testing.T) {
	defer etcd.SetScanPage(3)()
	s := openStore(t)
	createN(t, s, 10, nil)
	if err := s.PutIntent(t.Context(), broker.Intent{LeaseID: "i0"}); err != nil {
		t.Fatal(err)
	}
	compactOnce := func(t *testing.T, change func(ctx context.Context) error) func() {
		var once sync.Once
		return func() {
			once.Do(func() {
				ctx := context.Background()
				if err := change(ctx); err != nil {
					t.Errorf("change: %v", err)
				}
				cli := s.Client()
				resp, err := cli.Get(ctx, "any")
				if err != nil {
					t.Fatal(err)
				}
				if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
					t.Errorf("Compact: %v", err)
				}
			})
		}
	}
	t.Run("ScanExpiry", func(t *testing.T) {
		defer etcd.SetPageHook(compactOnce(t, func(ctx context.Context) error {
			l := storetest.NewLease("first", "ro", "svc", at(-time.Hour))
			return s.CreateLease(ctx, &l)
		}))()
		got := storetest.ScanExpiry(t, s)
		if len(got) != 11 || got[0].LeaseID != "first" {
			t.Errorf("ScanExpiry = %d entries from %+v, want 11 from the new lease", len(got), got[0])
		}
	})
	t.Run("ListLeases", func(t *testing.T) {
		defer etcd.SetPageHook(compactOnce(t, func(ctx context.Context) error { return s.DeleteLease(ctx, "l009") }))()
		got, next, err := s.ListLeases(t.Context(), broker.LeaseFilter{Role: "ro"})
		if err != nil || next != "" {
			t.Fatalf("ListLeases: %v, next %q", err, next)
		}
		if ids := storetest.IDs(got); len(ids) != 10 || slices.Contains(ids, "l009") {
			t.Errorf("ListLeases = %q, want 10 leases without l009", ids)
		}
	})
	t.Run("ListIntents", func(t *testing.T) {
		for i := 1; i < 7; i++ {
			if err := s.PutIntent(t.Context(), broker.Intent{LeaseID: fmt.Sprintf("i%d", i)}); err != nil {
				t.Fatal(err)
			}
		}
		defer etcd.SetPageHook(compactOnce(t, func(ctx context.Context) error { return s.DeleteIntent(ctx, "i6") }))()
		got, err := s.ListIntents(t.Context())
		if err != nil || len(got) != 6 {
			t.Errorf("ListIntents = %+v, %v; want i0..i5", got, err)
		}
	})
}

// A write that times out without a quorum is an unknown outcome; a read
// that times out is just an error.
func TestUnknownOutcome(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a three-member cluster")
	}
	c := etcdtest.StartCluster(t, 3)
	s, err := etcd.Open(t.Context(), etcd.Options{
		Endpoints: []string{c.Members[0].ClientURL}, Prefix: "/credbroker/", RequestTimeout: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	l := storetest.MustCreate(t, s, storetest.NewLease("a", "ro", "svc", at(time.Minute)))[0]
	c.Members[1].Kill()
	c.Members[2].Kill()

	l.ExpireTime = at(time.Hour)
	if _, err := s.UpdateLease(t.Context(), l); err == nil {
		// The read before the write may fail first (no leader): not
		// an unknown outcome then, and not what this test is after.
		t.Fatal("UpdateLease without a quorum succeeded")
	}
	n := storetest.NewLease("b", "ro", "svc", at(time.Minute))
	err = s.CreateLease(t.Context(), &n)
	if !errors.Is(err, broker.ErrUnknownOutcome) {
		t.Errorf("CreateLease without a quorum: %v, want ErrUnknownOutcome", err)
	}
	t.Logf("CreateLease without a quorum: %v", err)
	if err := s.PutIntent(t.Context(), broker.Intent{LeaseID: "c"}); !errors.Is(err, broker.ErrUnknownOutcome) {
		t.Errorf("PutIntent without a quorum: %v, want ErrUnknownOutcome", err)
	}
	if _, err := s.GetLease(t.Context(), "a"); err == nil || errors.Is(err, broker.ErrUnknownOutcome) {
		t.Errorf("GetLease without a quorum: %v, want a plain error", err)
	}
}

// GroupID creates one id per prefix, whoever asks first, and keeps it.
func TestGroupID(t *testing.T) {
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	const n = 8
	ids := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		s := openAt(t, eps, prefix)
		wg.Go(func() {
			id, err := s.GroupID(t.Context())
			if err != nil {
				t.Errorf("GroupID: %v", err)
			}
			ids[i] = id
		})
	}
	wg.Wait()
	for _, id := range ids {
		if id == "" || id != ids[0] {
			t.Fatalf("concurrent GroupID calls returned %q", ids)
		}
	}
	again, err := openAt(t, eps, prefix).GroupID(t.Context())
	if err != nil || again != ids[0] {
		t.Errorf("GroupID after reopen = %q, %v; want %q", again, err, ids[0])
	}
	other, err := openStore(t).GroupID(t.Context())
	if err != nil || other == ids[0] {
		t.Errorf("GroupID on another prefix = %q, %v; want a new id", other, err)
	}
	s := openStore(t)
	_ = s.Close()
	if _, err := s.GroupID(t.Context()); !errors.Is(err, broker.ErrClosed) {
		t.Errorf("GroupID after Close: %v, want ErrClosed", err)
	}
}

func TestOpenRefuses(t *testing.T) {
	for _, p := range []string{"/credbroker", "x"} {
		if _, err := etcd.Open(t.Context(), etcd.Options{Endpoints: []string{"http://127.0.0.1:1"}, Prefix: p}); !errors.Is(err, broker.ErrInvalidArgument) {
			t.Errorf("Open with prefix %q: %v, want ErrInvalidArgument", p, err)
		}
	}
	if _, err := etcd.Open(t.Context(), etcd.Options{}); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Errorf("Open without endpoints: %v, want ErrInvalidArgument", err)
	}
	start := time.Now()
	if _, err := etcd.Open(t.Context(), etcd.Options{Endpoints: []string{"http://127.0.0.1:1"}, DialTimeout: 300 * time.Millisecond}); err == nil {
		t.Error("Open of an endpoint nobody listens on succeeded")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Open of a dead endpoint took %v", d)
	}
}
