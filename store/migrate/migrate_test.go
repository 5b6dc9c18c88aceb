package migrate_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/migrate"
)

func TestMain(m *testing.M) { os.Exit(etcdtest.Main(m)) }

// openBolt opens a bbolt store in the test's directory, closed at its end.
func openBolt(t *testing.T) *store.Store {
	t.Helper()
	s, err := store.Open(filepath.Join(t.TempDir(), "leases.db"), store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// openEtcd opens an etcd store on a fresh prefix of the test binary's etcd.
func openEtcd(t *testing.T) *etcd.Store {
	t.Helper()
	eps := etcdtest.Server(t)
	return openEtcdAt(t, eps, etcdtest.Prefix(t, eps))
}

func openEtcdAt(t *testing.T, eps []string, prefix string) *etcd.Store {
	t.Helper()
	s, err := etcd.Open(t.Context(), etcd.Options{Endpoints: eps, Prefix: prefix, DialTimeout: 20 * time.Second, RequestTimeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

var base = time.Date(2026, 3, 1, 12, 0, 0, 123456789, time.UTC)

// fill writes n leases through the store's own interface, as a broker
// would, cycling through every state (with metadata, errors and the
// flags set on some), plus a few intents and a second role; it returns
// the leases as stored.
func fill(t *testing.T, s broker.LeaseStore, n int) []broker.Lease {
	t.Helper()
	ctx := t.Context()
	if _, err := s.GroupID(ctx); err != nil {
		t.Fatal(err)
	}
	var out []broker.Lease
	for i := range n {
		issue := base.Add(time.Duration(i) * time.Second)
		l := broker.Lease{
			ID:            fmt.Sprintf("lease-%05d", i),
			Role:          []string{"read_only", "updater", "admin"}[i%3],
			Client:        fmt.Sprintf("svc-%d", i%7),
			Target:        "main",
			Username:      fmt.Sprintf("cb_user_%05d", i),
			ProxyRole:     "read_only_role",
			IssueTime:     issue,
			ExpireTime:    issue.Add(15 * time.Minute),
			MaxExpireTime: issue.Add(time.Hour),
			State:         broker.StateActive,
		}
		if i%4 == 0 {
			l.Metadata = map[string]string{"pod": fmt.Sprintf("api-%d", i), "note": strings.Repeat("x", 400)}
		}
		if i%9 == 0 {
			l.RevokeOnDisconnect = true
		}
		if err := s.PutIntent(ctx, broker.Intent{LeaseID: l.ID, Target: l.Target, Username: l.Username, ProxyRole: l.ProxyRole, CreateTime: issue}); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateLease(ctx, &l); err != nil {
			t.Fatal(err)
		}
		switch i % 5 {
		case 1: // revoked: a tombstone
			l.State, l.EndTime = broker.StateRevoked, issue.Add(time.Minute)
		case 2: // expired: a tombstone
			l.State, l.EndTime = broker.StateExpired, l.ExpireTime
		case 3: // a revocation that keeps failing
			l.State, l.RevokeAttempts, l.LastError = broker.StateRevokeFailed, 5, "connection refused"
			l.NextAttempt = issue.Add(20 * time.Minute)
		case 4: // an admin's revocation under way
			l.State, l.EndTime, l.ValidUntilBehind = broker.StateRevoking, issue.Add(2*time.Minute), true
		}
		if i%5 != 0 {
			var err error
			if l, err = s.UpdateLease(ctx, l); err != nil {
				t.Fatal(err)
			}
		}
		out = append(out, l)
	}
	// Intents a crash left: users being created, without a lease.
	for i := range 3 {
		in := broker.Intent{LeaseID: fmt.Sprintf("orphan-%d", i), Target: "main", Username: fmt.Sprintf("cb_orphan_%d", i),
			ProxyRole: "read_only_role", CreateTime: base.Add(time.Duration(i) * time.Millisecond), Group: "g-other"}
		if i == 0 {
			in.Group = ""
		}
		if err := s.PutIntent(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// checkSame compares every record of dst with src's, through the stores'
// own reads, independently of migrate.Verify.
func checkSame(t *testing.T, src broker.LeaseStore, dst *etcd.Store, want []broker.Lease) {
	t.Helper()
	ctx := t.Context()
	for _, w := range want {
		got, err := dst.GetLease(ctx, w.ID)
		if err != nil {
			t.Fatalf("target: GetLease(%s): %v", w.ID, err)
		}
		w.Revision, got.Revision = 0, 0
		if !sameLease(w, got) {
			t.Fatalf("lease %s:\n source %+v\n target %+v", w.ID, w, got)
		}
	}
	srcIntents, err := src.ListIntents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dstIntents, err := dst.ListIntents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(srcIntents) != len(dstIntents) {
		t.Fatalf("intents: %d in the source, %d in the target", len(srcIntents), len(dstIntents))
	}
	for i := range srcIntents {
		a, b := srcIntents[i], dstIntents[i]
		if a.LeaseID != b.LeaseID || a.Username != b.Username || a.Group != b.Group || !a.CreateTime.Equal(b.CreateTime) {
			t.Fatalf("intent %d: source %+v, target %+v", i, a, b)
		}
	}
	type entry struct {
		id, user string
		at       int64
		state    broker.LeaseState
	}
	scan := func(s broker.LeaseStore) []entry {
		var out []entry
		if err := s.ScanExpiry(ctx, func(e broker.ExpiryEntry) bool {
			out = append(out, entry{e.LeaseID, e.Username, e.Expire.UnixNano(), e.State})
			return true
		}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	se, de := scan(src), scan(dst)
	if fmt.Sprint(se) != fmt.Sprint(de) {
		t.Fatalf("expiry index:\n source %v\n target %v", se, de)
	}
	sl, err := src.(broker.LastIssuedReader).LastIssued(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dl, err := dst.LastIssued(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sl) == 0 || len(sl) != len(dl) {
		t.Fatalf("last issue times: source %v, target %v", sl, dl)
	}
	for role, at := range sl {
		if !dl[role].Equal(at) {
			t.Fatalf("role %s last issued: source %v, target %v", role, at, dl[role])
		}
	}
	sg, _ := src.GroupID(ctx)
	dg, err := dst.GroupID(ctx)
	if err != nil || sg == "" || sg != dg {
		t.Fatalf("group id: source %q, target %q (%v)", sg, dg, err)
	}
}

func sameLease(a, b broker.Lease) bool {
	return fmt.Sprint(norm(a)) == fmt.Sprint(norm(b))
}

func norm(l broker.Lease) broker.Lease {
	for _, t := range []*time.Time{&l.IssueTime, &l.ExpireTime, &l.MaxExpireTime, &l.NextAttempt, &l.EndTime} {
		if !t.IsZero() {
			*t = t.UTC()
		}
	}
	if len(l.Metadata) == 0 {
		l.Metadata = nil
	}
	return l
}

func TestCopyEveryRecord(t *testing.T) {
	src := openBolt(t)
	want := fill(t, src, 300)
	dst := openEtcd(t)

	var progress []int
	// A page of 100 leases is two Txns of 64 and one of the rest: the
	// copy crosses etcd's 128-operations limit many times.
	rep, err := migrate.Copy(t.Context(), src, dst, migrate.Options{PageSize: 100, Progress: func(n int) { progress = append(progress, n) }})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Leases != 300 || rep.Live != 180 || rep.Terminal != 120 || rep.Intents != 3 || rep.Roles != 3 ||
		rep.WrittenLeases != 300 || rep.WrittenIntents != 3 {
		t.Fatalf("report %+v", rep)
	}
	if fmt.Sprint(progress) != "[100 200 300]" {
		t.Fatalf("progress %v", progress)
	}
	checkSame(t, src, dst, want)
	counts, err := dst.CountKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if counts.Leases != 300 || counts.Expiry != 180 || counts.Tombstones != 120 || counts.Intents != 3 || counts.LastIssued != 3 || counts.Group != 1 {
		t.Fatalf("target keys %+v", counts)
	}

	// The copy is a working store: a migrated lease updates with the
	// target's revision, and its tombstones purge.
	l, err := dst.GetLease(t.Context(), "lease-00000")
	if err != nil {
		t.Fatal(err)
	}
	l.ExpireTime = l.ExpireTime.Add(time.Minute)
	if _, err := dst.UpdateLease(t.Context(), l); err != nil {
		t.Fatalf("UpdateLease on a migrated lease: %v", err)
	}
	n, err := dst.PurgeTombstones(t.Context(), base.Add(24*time.Hour), 1000)
	if err != nil || n != 120 {
		t.Fatalf("PurgeTombstones = %d, %v; want the 120 migrated tombstones", n, err)
	}
}

func TestCopyRefusesANonEmptyPrefix(t *testing.T) {
	src := openBolt(t)
	fill(t, src, 10)
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	other := openEtcdAt(t, eps, prefix)
	// Another group already uses the prefix.
	otherGroup, err := other.GroupID(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	l := broker.Lease{ID: "theirs", Role: "r", Target: "main", Username: "u", IssueTime: base, ExpireTime: base.Add(time.Hour),
		MaxExpireTime: base.Add(time.Hour), State: broker.StateActive}
	if err := other.CreateLease(t.Context(), &l); err != nil {
		t.Fatal(err)
	}
	before, err := other.CountKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}

	dst := openEtcdAt(t, eps, prefix)
	for _, resume := range []bool{false, true} {
		_, err := migrate.Copy(t.Context(), src, dst, migrate.Options{Resume: resume})
		if !errors.Is(err, migrate.ErrTargetNotEmpty) {
			t.Fatalf("resume=%v: Copy into a used prefix: %v, want ErrTargetNotEmpty", resume, err)
		}
		if resume && !strings.Contains(err.Error(), otherGroup) {
			t.Fatalf("resume=%v: %v does not name the prefix's group %s", resume, err, otherGroup)
		}
	}
	after, err := dst.CountKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Fatalf("a refused copy wrote: keys %+v before, %+v after", before, after)
	}

	// Keys without a group id (not a broker's, not an earlier copy's)
	// are refused even with resume, and left alone.
	bare := openEtcdAt(t, eps, etcdtest.Prefix(t, eps))
	if _, err := bare.ImportIntents(t.Context(), []broker.Intent{{LeaseID: "x", CreateTime: base}}); err != nil {
		t.Fatal(err)
	}
	if _, err := migrate.Copy(t.Context(), src, bare, migrate.Options{Resume: true}); !errors.Is(err, migrate.ErrTargetNotEmpty) || !strings.Contains(err.Error(), "no group id") {
		t.Fatalf("Copy into keys without a group: %v", err)
	}
	if c, err := bare.CountKeys(t.Context()); err != nil || c.All != 1 {
		t.Fatalf("refused copy wrote: %+v, %v", c, err)
	}
}

// cutTarget is the etcd store failing ImportLeases after some calls, as a
// copy cut off by a crash or a timeout would be.
type cutTarget struct {
	*etcd.Store
	calls, failAt int
}

var errCut = errors.New("cut off")

func (c *cutTarget) ImportLeases(ctx context.Context, ls []broker.Lease) (int, error) {
	c.calls++
	if c.calls == c.failAt {
		// Half the page is written, then the copy stops.
		n, err := c.Store.ImportLeases(ctx, ls[:len(ls)/2])
		if err != nil {
			return n, err
		}
		return n, errCut
	}
	return c.Store.ImportLeases(ctx, ls)
}

func TestCopyResumesAfterACut(t *testing.T) {
	src := openBolt(t)
	want := fill(t, src, 250)
	eps := etcdtest.Server(t)
	prefix := etcdtest.Prefix(t, eps)
	dst := openEtcdAt(t, eps, prefix)

	_, err := migrate.Copy(t.Context(), src, &cutTarget{Store: dst, failAt: 2}, migrate.Options{PageSize: 100})
	if !errors.Is(err, errCut) {
		t.Fatalf("cut copy: %v", err)
	}
	// 100 + 50 leases are there; running again without resume refuses.
	if _, err := migrate.Copy(t.Context(), src, dst, migrate.Options{PageSize: 100}); !errors.Is(err, migrate.ErrTargetNotEmpty) {
		t.Fatalf("second run without resume: %v", err)
	}
	rep, err := migrate.Copy(t.Context(), src, dst, migrate.Options{PageSize: 100, Resume: true})
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	if rep.Leases != 250 || rep.WrittenLeases != 100 || rep.WrittenIntents != 0 {
		t.Fatalf("resume report %+v: want 250 leases of which 100 written now", rep)
	}
	checkSame(t, src, dst, want)

	// Resuming a finished copy writes nothing and verifies.
	rep, err = migrate.Copy(t.Context(), src, dst, migrate.Options{Resume: true})
	if err != nil || rep.WrittenLeases != 0 {
		t.Fatalf("resume of a finished copy: %+v, %v", rep, err)
	}

	// A lease the target changed since is not overwritten: resume stops
	// and names it.
	l, err := dst.GetLease(t.Context(), "lease-00007")
	if err != nil {
		t.Fatal(err)
	}
	l.LastError = "changed on the target"
	if _, err := dst.UpdateLease(t.Context(), l); err != nil {
		t.Fatal(err)
	}
	_, err = migrate.Copy(t.Context(), src, dst, migrate.Options{Resume: true})
	if !errors.Is(err, broker.ErrExists) || !strings.Contains(err.Error(), "lease-00007") {
		t.Fatalf("resume over a changed lease: %v", err)
	}
	if got, _ := dst.GetLease(t.Context(), "lease-00007"); got.LastError != "changed on the target" {
		t.Fatalf("resume overwrote the target's lease: %+v", got)
	}
}

func TestVerifyFindsADifference(t *testing.T) {
	src := openBolt(t)
	fill(t, src, 20)
	// Each case changes a fresh copy.
	copyOf := func(t *testing.T) *etcd.Store {
		dst := openEtcd(t)
		if _, err := migrate.Copy(t.Context(), src, dst, migrate.Options{}); err != nil {
			t.Fatal(err)
		}
		if err := migrate.Verify(t.Context(), src, dst, 7); err != nil {
			t.Fatalf("Verify of a good copy: %v", err)
		}
		return dst
	}
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, dst *etcd.Store)
		want   string
	}{
		{"a field", func(t *testing.T, dst *etcd.Store) {
			l, err := dst.GetLease(t.Context(), "lease-00003")
			if err != nil {
				t.Fatal(err)
			}
			l.RevokeAttempts++
			if _, err := dst.UpdateLease(t.Context(), l); err != nil {
				t.Fatal(err)
			}
		}, "lease lease-00003: revoke attempts differs"},
		{"a missing lease", func(t *testing.T, dst *etcd.Store) {
			if err := dst.DeleteLease(t.Context(), "lease-00011"); err != nil {
				t.Fatal(err)
			}
		}, "lease lease-00011 is missing from the target"},
		{"an extra lease", func(t *testing.T, dst *etcd.Store) {
			l := broker.Lease{ID: "lease-00011a", Role: "r", Target: "main", Username: "u", IssueTime: base,
				ExpireTime: base.Add(time.Hour), MaxExpireTime: base.Add(time.Hour), State: broker.StateActive}
			if err := dst.CreateLease(t.Context(), &l); err != nil {
				t.Fatal(err)
			}
		}, "the target holds lease lease-00011a"},
		{"an intent", func(t *testing.T, dst *etcd.Store) {
			if err := dst.DeleteIntent(t.Context(), "orphan-1"); err != nil {
				t.Fatal(err)
			}
		}, "3 intents in the source, 2 in the target"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := copyOf(t)
			tc.change(t, dst)
			err := migrate.Verify(t.Context(), src, dst, 7)
			if !errors.Is(err, migrate.ErrMismatch) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Verify = %v, want ErrMismatch saying %q", err, tc.want)
			}
		})
	}
}
