package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// t0 is an arbitrary instant with nanoseconds, so the tests see any loss of
// precision.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

func at(d time.Duration) time.Time { return t0.Add(d) }

// openStore opens a store in a fresh directory and closes it at the end of
// the test. Tests skip fsync: durability is bbolt's, not under test here.
func openStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "leases.db"), Options{NoSync: true})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// newLease returns an active lease with every field set.
func newLease(id, role, client string, expire time.Time) broker.Lease {
	return broker.Lease{
		ID:            id,
		Role:          role,
		Client:        client,
		Target:        "main",
		Username:      "cb_" + role + "_" + id,
		ProxyRole:     role + "_role",
		IssueTime:     t0,
		ExpireTime:    expire,
		MaxExpireTime: t0.Add(time.Hour),
		State:         broker.StateActive,
		Metadata:      map[string]string{"pod": "api-" + id, "ns": "prod"},
	}
}

func mustCreate(t *testing.T, s *Store, leases ...broker.Lease) []broker.Lease {
	t.Helper()
	out := make([]broker.Lease, 0, len(leases))
	for _, l := range leases {
		if err := s.CreateLease(t.Context(), &l); err != nil {
			t.Fatalf("CreateLease(%s): %v", l.ID, err)
		}
		out = append(out, l)
	}
	return out
}

func mustGet(t *testing.T, s *Store, id string) broker.Lease {
	t.Helper()
	l, err := s.GetLease(t.Context(), id)
	if err != nil {
		t.Fatalf("GetLease(%s): %v", id, err)
	}
	return l
}

func mustUpdate(t *testing.T, s *Store, l broker.Lease) broker.Lease {
	t.Helper()
	got, err := s.UpdateLease(t.Context(), l)
	if err != nil {
		t.Fatalf("UpdateLease(%s): %v", l.ID, err)
	}
	return got
}

// normalize puts a lease in the form the store returns, so leases can be
// compared with reflect.DeepEqual.
func normalize(l broker.Lease) broker.Lease {
	for _, p := range []*time.Time{&l.IssueTime, &l.ExpireTime, &l.MaxExpireTime, &l.NextAttempt, &l.EndTime} {
		if !p.IsZero() {
			*p = p.UTC().Round(0)
		}
	}
	if len(l.Metadata) == 0 {
		l.Metadata = nil
	}
	return l
}

func assertLeaseEqual(t *testing.T, got, want broker.Lease) {
	t.Helper()
	if g, w := normalize(got), normalize(want); !reflect.DeepEqual(g, w) {
		t.Errorf("lease mismatch\n got: %+v\nwant: %+v", g, w)
	}
}

func scanExpiry(t *testing.T, s *Store) []broker.ExpiryEntry {
	t.Helper()
	var out []broker.ExpiryEntry
	if err := s.ScanExpiry(t.Context(), func(e broker.ExpiryEntry) bool {
		out = append(out, e)
		return true
	}); err != nil {
		t.Fatalf("ScanExpiry: %v", err)
	}
	return out
}

func ids(leases []broker.Lease) []string {
	out := make([]string, len(leases))
	for i, l := range leases {
		out[i] = l.ID
	}
	return out
}

// checkIndexes asserts the invariant every write must keep: each live lease
// has exactly one expiry key (its expire time), each terminal lease exactly
// one tombstone key (its end time), and the indexes hold nothing else.
func checkIndexes(t *testing.T, s *Store) {
	t.Helper()
	err := s.db.View(func(tx *bolt.Tx) error {
		want := map[string][]string{string(bucketExpiry): nil, string(bucketTombstones): nil}
		err := tx.Bucket(bucketLeases).ForEach(func(k, v []byte) error {
			h, _, err := decodeLeaseHead(v)
			if err != nil {
				return err
			}
			idx, ok := h.index(string(k))
			if !ok {
				return fmt.Errorf("lease %s in unindexed state %s", k, h.state)
			}
			want[string(idx.bucket)] = append(want[string(idx.bucket)], string(idx.key))
			return nil
		})
		if err != nil {
			return err
		}
		for name, keys := range want {
			var got []string
			_ = tx.Bucket([]byte(name)).ForEach(func(k, _ []byte) error {
				got = append(got, string(k))
				return nil
			})
			slices.Sort(keys)
			if !slices.Equal(got, keys) {
				t.Errorf("bucket %s holds %q, want %q", name, got, keys)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("checkIndexes: %v", err)
	}
}

func TestOpen(t *testing.T) {
	t.Run("creates directory 0700 and file 0600", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "var", "credbroker")
		path := filepath.Join(dir, "leases.db")
		s, err := Open(path, Options{NoSync: true})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		defer s.Close()
		for p, want := range map[string]os.FileMode{dir: 0o700, path: 0o600} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != want {
				t.Errorf("%s: mode %v, want %v", p, got, want)
			}
		}
		if n, err := s.Size(); err != nil || n <= 0 {
			t.Errorf("Size() = %d, %v; want a positive size", n, err)
		}
	})

	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		path    func(dir string) string
		want    string
	}{
		{
			name: "empty path",
			path: func(string) string { return "" },
			want: "empty path",
		},
		{
			name: "not a bbolt file",
			prepare: func(t *testing.T, path string) {
				t.Helper()
				if err := os.WriteFile(path, bytes.Repeat([]byte("not bolt"), 1024), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			want: "open lease store",
		},
		{
			name: "newer schema",
			prepare: func(t *testing.T, path string) {
				t.Helper()
				s, err := Open(path, Options{NoSync: true})
				if err != nil {
					t.Fatal(err)
				}
				err = s.db.Update(func(tx *bolt.Tx) error {
					return tx.Bucket(bucketMeta).Put(metaKeySchemaVersion, encodeSchemaVersion(schemaVersion+1))
				})
				if err != nil {
					t.Fatal(err)
				}
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			},
			want: "newer than this binary supports",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "leases.db")
			if tt.path != nil {
				path = tt.path(filepath.Dir(path))
			}
			if tt.prepare != nil {
				tt.prepare(t, path)
			}
			s, err := Open(path, Options{NoSync: true})
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded, want an error")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("Open error %q should contain %q and the path", err, tt.want)
			}
		})
	}
}

func TestOpenLockedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leases.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	// flock locks belong to the open file, so a second Open in the same
	// process contends exactly as a second brokerd would.
	second, err := Open(path, Options{Timeout: 100 * time.Millisecond, NoSync: true})
	if err == nil {
		second.Close()
		t.Fatal("second Open of a locked file succeeded")
	}
	if !errors.Is(err, ErrLocked) {
		t.Errorf("error %v is not ErrLocked", err)
	}
	if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, "locked by another process") {
		t.Errorf("error %q should name the path and say the file is locked", msg)
	}

	// The first handle is unaffected, and the lock goes with Close.
	mustCreate(t, s, newLease("a", "ro", "svc", at(time.Minute)))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	third, err := Open(path, Options{Timeout: 100 * time.Millisecond, NoSync: true})
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	third.Close()
}

func TestCreateAndGetLease(t *testing.T) {
	full := newLease("lease-full", "read_only", "billing", at(15*time.Minute))
	full.LastError = "pg: connection refused"
	full.RevokeAttempts = 3
	full.NextAttempt = at(16 * time.Minute)
	full.RevokeOnDisconnect = true
	full.State = broker.StateRevokeFailed

	revoked := newLease("lease-revoked", "admin", "ops", at(time.Minute))
	revoked.State = broker.StateRevoked
	revoked.EndTime = at(30 * time.Second)
	revoked.Metadata = nil

	local := newLease("lease-local", "updater", "", time.Date(2030, 5, 6, 7, 8, 9, 10, time.FixedZone("CEST", 2*3600)))
	local.Metadata = map[string]string{}

	for _, l := range []broker.Lease{full, revoked, local} {
		t.Run(l.ID, func(t *testing.T) {
			s := openStore(t)
			in := l
			in.Revision = 77 // callers cannot choose the first revision
			if err := s.CreateLease(t.Context(), &in); err != nil {
				t.Fatalf("CreateLease: %v", err)
			}
			if in.Revision != 1 {
				t.Errorf("CreateLease set Revision %d, want 1", in.Revision)
			}
			want := l
			want.Revision = 1
			got := mustGet(t, s, l.ID)
			assertLeaseEqual(t, got, want)
			if loc := got.ExpireTime.Location(); loc != time.UTC {
				t.Errorf("stored times come back in %v, want UTC", loc)
			}
			checkIndexes(t, s)
		})
	}
}

func TestGetLeaseNotFound(t *testing.T) {
	s := openStore(t)
	for _, id := range []string{"missing", ""} {
		if _, err := s.GetLease(t.Context(), id); !errors.Is(err, broker.ErrLeaseNotFound) {
			t.Errorf("GetLease(%q) error %v, want ErrLeaseNotFound", id, err)
		}
	}
}

func TestCreateLeaseRejects(t *testing.T) {
	ok := newLease("taken", "ro", "svc", at(time.Minute))
	tests := []struct {
		name   string
		mutate func(l *broker.Lease)
		want   error
	}{
		{"existing id", func(*broker.Lease) {}, broker.ErrExists},
		{"empty id", func(l *broker.Lease) { l.ID = "" }, broker.ErrInvalidArgument},
		{"overlong id", func(l *broker.Lease) { l.ID = strings.Repeat("x", maxIDLen+1) }, broker.ErrInvalidArgument},
		{"unspecified state", func(l *broker.Lease) { l.ID, l.State = "s0", broker.StateUnspecified }, broker.ErrInvalidArgument},
		{"unknown state", func(l *broker.Lease) { l.ID, l.State = "s42", broker.LeaseState(42) }, broker.ErrInvalidArgument},
		{"live without expire time", func(l *broker.Lease) { l.ID, l.ExpireTime = "noexp", time.Time{} }, broker.ErrInvalidArgument},
		{"terminal without end time", func(l *broker.Lease) { l.ID, l.State = "noend", broker.StateExpired }, broker.ErrInvalidArgument},
		{"year 1000 (UnixNano wraps positive)", func(l *broker.Lease) { l.ID, l.EndTime = "y1000", time.Date(1000, 1, 1, 0, 0, 0, 0, time.UTC) }, broker.ErrInvalidArgument},
		{"negative revoke attempts", func(l *broker.Lease) { l.ID, l.RevokeAttempts = "neg", -1 }, broker.ErrInvalidArgument},
		{"time before 1970", func(l *broker.Lease) { l.ID, l.IssueTime = "old", time.Date(1969, 1, 1, 0, 0, 0, 0, time.UTC) }, broker.ErrInvalidArgument},
		{"time after 2262", func(l *broker.Lease) { l.ID, l.MaxExpireTime = "far", time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC) }, broker.ErrInvalidArgument},
	}
	s := openStore(t)
	mustCreate(t, s, ok)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := ok.Clone()
			tt.mutate(&l)
			err := s.CreateLease(t.Context(), &l)
			if !errors.Is(err, tt.want) {
				t.Fatalf("CreateLease error %v, want %v", err, tt.want)
			}
			if l.Revision != 0 {
				t.Errorf("failed CreateLease set Revision %d", l.Revision)
			}
		})
	}
	t.Run("nil lease", func(t *testing.T) {
		if err := s.CreateLease(t.Context(), nil); !errors.Is(err, broker.ErrInvalidArgument) {
			t.Errorf("CreateLease(nil) error %v, want ErrInvalidArgument", err)
		}
	})
	// Nothing a rejected create touched may remain.
	all, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(all); !slices.Equal(got, []string{"taken"}) {
		t.Errorf("leases after rejected creates: %q", got)
	}
	assertLeaseEqual(t, all[0], func() broker.Lease { l := ok; l.Revision = 1; return l }())
	checkIndexes(t, s)
}

func TestUpdateLease(t *testing.T) {
	tests := []struct {
		name   string
		update func(l broker.Lease) broker.Lease
		want   error
	}{
		{"current revision", func(l broker.Lease) broker.Lease { l.ExpireTime = at(time.Hour); return l }, nil},
		{"stale revision", func(l broker.Lease) broker.Lease { l.Revision = 0; return l }, broker.ErrConflict},
		{"future revision", func(l broker.Lease) broker.Lease { l.Revision = 9; return l }, broker.ErrConflict},
		{"missing lease", func(l broker.Lease) broker.Lease { l.ID = "nope"; return l }, broker.ErrLeaseNotFound},
		{"invalid lease", func(l broker.Lease) broker.Lease { l.State = broker.StateUnspecified; return l }, broker.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t)
			created := mustCreate(t, s, newLease("l1", "ro", "svc", at(time.Minute)))[0]
			in := tt.update(created.Clone())
			got, err := s.UpdateLease(t.Context(), in)
			if !errors.Is(err, tt.want) {
				t.Fatalf("UpdateLease error %v, want %v", err, tt.want)
			}
			stored := mustGet(t, s, "l1")
			if tt.want != nil {
				assertLeaseEqual(t, stored, created) // untouched
				checkIndexes(t, s)
				return
			}
			want := in
			want.Revision = created.Revision + 1
			assertLeaseEqual(t, got, want)
			assertLeaseEqual(t, stored, got)
			checkIndexes(t, s)

			// The returned lease is the base for the next update; the
			// one before it is now stale.
			if _, err := s.UpdateLease(t.Context(), in); !errors.Is(err, broker.ErrConflict) {
				t.Errorf("update from the old revision: %v, want ErrConflict", err)
			}
			if again := mustUpdate(t, s, got); again.Revision != got.Revision+1 {
				t.Errorf("second update revision %d, want %d", again.Revision, got.Revision+1)
			}
		})
	}
}

func TestIntents(t *testing.T) {
	s := openStore(t)
	ctx := t.Context()
	intents := []broker.Intent{
		{LeaseID: "b", Target: "main", Username: "cb_ro_b", ProxyRole: "ro_role", CreateTime: at(0)},
		{LeaseID: "a", Target: "main", Username: "cb_ro_a", ProxyRole: "ro_role", CreateTime: at(time.Second)},
		{LeaseID: "c", Target: "other", Username: "cb_ro_c", ProxyRole: "ro_role"},
	}
	for _, in := range intents {
		if err := s.PutIntent(ctx, in); err != nil {
			t.Fatalf("PutIntent(%s): %v", in.LeaseID, err)
		}
	}
	if err := s.PutIntent(ctx, broker.Intent{}); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Errorf("PutIntent without id: %v, want ErrInvalidArgument", err)
	}

	// Creating lease "a" consumes its intent in the same transaction.
	mustCreate(t, s, newLease("a", "ro", "svc", at(time.Minute)))
	if err := s.DeleteIntent(ctx, "c"); err != nil {
		t.Fatalf("DeleteIntent: %v", err)
	}
	if err := s.DeleteIntent(ctx, "never-existed"); err != nil {
		t.Errorf("DeleteIntent of a missing intent: %v", err)
	}

	got, err := s.ListIntents(ctx)
	if err != nil {
		t.Fatalf("ListIntents: %v", err)
	}
	want := []broker.Intent{intents[0]}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ListIntents = %+v, want %+v", got, want)
	}
}

// TestIndexesFollowLifecycle walks leases through their lifecycle and checks
// after each step that the expiry index holds exactly the live leases in
// expire order, and the tombstone index exactly the terminal ones.
func TestIndexesFollowLifecycle(t *testing.T) {
	s := openStore(t)
	leases := map[string]broker.Lease{}
	for _, l := range mustCreate(t, s,
		newLease("a", "ro", "svc", at(3*time.Minute)),
		newLease("b", "ro", "svc", at(1*time.Minute)),
		newLease("c", "rw", "svc", at(2*time.Minute)),
		newLease("d", "rw", "svc", at(2*time.Minute)), // ties with c: id order
	) {
		leases[l.ID] = l
	}

	steps := []struct {
		name       string
		change     func(l *broker.Lease)
		id         string
		wantExpiry []string // ids in scan order
		wantTombs  []string // ids in end-time order
	}{
		{"initial", nil, "", []string{"b", "c", "d", "a"}, nil},
		{"renew b past a", func(l *broker.Lease) { l.ExpireTime = at(4 * time.Minute) }, "b", []string{"c", "d", "a", "b"}, nil},
		{"revoking keeps d live", func(l *broker.Lease) { l.State = broker.StateRevoking }, "d", []string{"c", "d", "a", "b"}, nil},
		{"revoke failed with retry time", func(l *broker.Lease) {
			l.State, l.ExpireTime, l.LastError = broker.StateRevokeFailed, at(5*time.Minute), "boom"
		}, "d", []string{"c", "a", "b", "d"}, nil},
		{"a revoked", func(l *broker.Lease) { l.State, l.EndTime = broker.StateRevoked, at(10*time.Minute) }, "a", []string{"c", "b", "d"}, []string{"a"}},
		{"c expired earlier", func(l *broker.Lease) { l.State, l.EndTime = broker.StateExpired, at(9*time.Minute) }, "c", []string{"b", "d"}, []string{"c", "a"}},
		{"tombstone end time moves", func(l *broker.Lease) { l.EndTime = at(11 * time.Minute) }, "c", []string{"b", "d"}, []string{"a", "c"}},
		{"d finally revoked", func(l *broker.Lease) { l.State, l.EndTime = broker.StateRevoked, at(8*time.Minute) }, "d", []string{"b"}, []string{"d", "a", "c"}},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			if step.change != nil {
				l := leases[step.id]
				step.change(&l)
				leases[step.id] = mustUpdate(t, s, l)
			}
			checkIndexes(t, s)

			var gotExpiry []string
			for _, e := range scanExpiry(t, s) {
				if want := leases[e.LeaseID].ExpireTime; !e.Expire.Equal(want) {
					t.Errorf("expiry entry %s at %v, lease expires %v", e.LeaseID, e.Expire, want)
				}
				gotExpiry = append(gotExpiry, e.LeaseID)
			}
			if !slices.Equal(gotExpiry, step.wantExpiry) {
				t.Errorf("ScanExpiry order %q, want %q", gotExpiry, step.wantExpiry)
			}
			var gotTombs []string
			_ = s.db.View(func(tx *bolt.Tx) error {
				return tx.Bucket(bucketTombstones).ForEach(func(k, _ []byte) error {
					gotTombs = append(gotTombs, string(k[8:]))
					return nil
				})
			})
			if !slices.Equal(gotTombs, step.wantTombs) {
				t.Errorf("tombstone order %q, want %q", gotTombs, step.wantTombs)
			}
		})
	}
}

func TestScanExpiry(t *testing.T) {
	s := openStore(t)
	var want []broker.ExpiryEntry
	for i := range 10 {
		id := fmt.Sprintf("lease-%02d", 9-i) // insertion order differs from expiry order
		exp := at(time.Duration(i) * time.Second)
		l := newLease(id, "ro", "svc", exp)
		l.RevokeOnDisconnect = i%2 == 0
		mustCreate(t, s, l)
		want = append(want, broker.ExpiryEntry{Expire: exp, LeaseID: id, State: broker.StateActive,
			Target: l.Target, Username: l.Username, RevokeOnDisconnect: l.RevokeOnDisconnect})
	}
	dead := newLease("dead", "ro", "svc", at(0))
	dead.State, dead.EndTime = broker.StateExpired, at(0)
	mustCreate(t, s, dead)

	t.Run("all live leases in order", func(t *testing.T) {
		if got := scanExpiry(t, s); !reflect.DeepEqual(got, want) {
			t.Errorf("ScanExpiry = %v, want %v", got, want)
		}
	})
	t.Run("stops when fn returns false", func(t *testing.T) {
		var got []broker.ExpiryEntry
		err := s.ScanExpiry(t.Context(), func(e broker.ExpiryEntry) bool {
			got = append(got, e)
			return len(got) < 3
		})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want[:3]) {
			t.Errorf("ScanExpiry stopped with %v, want %v", got, want[:3])
		}
	})
}

func TestPurgeTombstones(t *testing.T) {
	// Five terminal leases ended at minutes 1..5 (created out of order) and
	// one live lease that must survive every purge.
	setup := func(t *testing.T) *Store {
		t.Helper()
		s := openStore(t)
		for _, m := range []int{3, 1, 5, 2, 4} {
			l := newLease(fmt.Sprintf("t%d", m), "ro", "svc", at(time.Duration(m)*time.Minute))
			l.State, l.EndTime = broker.StateRevoked, at(time.Duration(m)*time.Minute)
			if m%2 == 0 {
				l.State = broker.StateExpired
			}
			mustCreate(t, s, l)
		}
		mustCreate(t, s, newLease("live", "ro", "svc", at(0)))
		return s
	}
	tests := []struct {
		name        string
		endedBefore time.Time
		limit       int
		wantPurged  []string
		wantErr     error
	}{
		{"nothing ended before", at(time.Minute), 10, nil, nil},
		{"strictly before the cutoff", at(3 * time.Minute), 10, []string{"t1", "t2"}, nil},
		{"limit takes the oldest", at(time.Hour), 2, []string{"t1", "t2"}, nil},
		{"all tombstones", at(time.Hour), 100, []string{"t1", "t2", "t3", "t4", "t5"}, nil},
		{"far future cutoff", time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC), 100, []string{"t1", "t2", "t3", "t4", "t5"}, nil},
		{"zero cutoff", time.Time{}, 10, nil, nil},
		{"cutoff in year 1000", time.Date(1000, 1, 1, 0, 0, 0, 0, time.UTC), 10, nil, nil},
		{"zero limit", at(time.Hour), 0, nil, broker.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := setup(t)
			n, err := s.PurgeTombstones(t.Context(), tt.endedBefore, tt.limit)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("PurgeTombstones error %v, want %v", err, tt.wantErr)
			}
			if n != len(tt.wantPurged) {
				t.Errorf("purged %d, want %d", n, len(tt.wantPurged))
			}
			all, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{})
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range append([]string{"t1", "t2", "t3", "t4", "t5"}, "live") {
				gone := slices.Contains(tt.wantPurged, id)
				present := slices.Contains(ids(all), id)
				if gone == present {
					t.Errorf("lease %s: present=%v, want purged=%v", id, present, gone)
				}
			}
			checkIndexes(t, s)
		})
	}
}

func TestDeleteLease(t *testing.T) {
	s := openStore(t)
	ended := newLease("ended", "ro", "svc", at(time.Minute))
	ended.State, ended.EndTime = broker.StateExpired, at(time.Minute)
	mustCreate(t, s, newLease("live", "ro", "svc", at(time.Minute)), ended, newLease("keep", "ro", "svc", at(time.Minute)))

	// A record that no longer decodes, with an index key pointing at it.
	err := s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketLeases).Put([]byte("broken"), []byte{leaseFormat1, 1, 1}); err != nil {
			return err
		}
		return tx.Bucket(bucketExpiry).Put(timeKey(at(0).UnixNano(), "broken"), nil)
	})
	if err != nil {
		t.Fatal(err)
	}

	for _, id := range []string{"live", "ended", "broken", "missing"} {
		t.Run(id, func(t *testing.T) {
			if err := s.DeleteLease(t.Context(), id); err != nil {
				t.Fatalf("DeleteLease: %v", err)
			}
			if _, err := s.GetLease(t.Context(), id); !errors.Is(err, broker.ErrLeaseNotFound) {
				t.Errorf("GetLease after delete: %v, want ErrLeaseNotFound", err)
			}
		})
	}
	checkIndexes(t, s)
	mustGet(t, s, "keep")
}

func TestListLeases(t *testing.T) {
	s := openStore(t)
	roles := []string{"read_only", "updater", "admin"}
	clients := []string{"billing", "search"}
	var all []broker.Lease
	for i := range 30 {
		l := newLease(fmt.Sprintf("lease-%03d", 29-i), roles[i%3], clients[i%2], at(time.Duration(i)*time.Second))
		if i%5 == 0 {
			l.State, l.EndTime = broker.StateRevoked, at(time.Hour)
		}
		all = append(all, mustCreate(t, s, l)...)
	}
	slices.SortFunc(all, func(a, b broker.Lease) int { return strings.Compare(a.ID, b.ID) })

	filters := []struct {
		name string
		f    broker.LeaseFilter
	}{
		{"everything", broker.LeaseFilter{}},
		{"role", broker.LeaseFilter{Role: "updater"}},
		{"client", broker.LeaseFilter{Client: "search"}},
		{"state", broker.LeaseFilter{State: broker.StateRevoked}},
		{"role and client", broker.LeaseFilter{Role: "admin", Client: "billing"}},
		{"role client state", broker.LeaseFilter{Role: "read_only", Client: "billing", State: broker.StateActive}},
		{"no match", broker.LeaseFilter{Role: "nobody"}},
	}
	for _, tt := range filters {
		var want []broker.Lease
		for _, l := range all {
			if tt.f.Match(&l) {
				want = append(want, l)
			}
		}
		t.Run(tt.name, func(t *testing.T) {
			got, next, err := s.ListLeases(t.Context(), tt.f)
			if err != nil {
				t.Fatal(err)
			}
			if next != "" {
				t.Errorf("unlimited listing returned next token %q", next)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("ListLeases = %q, want %q", ids(got), ids(want))
			}
		})
		// Every page size, including ones that divide the result exactly
		// (the last full page must not promise a next page) and ones
		// larger than it.
		for limit := 1; limit <= len(want)+1; limit++ {
			t.Run(fmt.Sprintf("%s/pages of %d", tt.name, limit), func(t *testing.T) {
				f := tt.f
				f.Limit = limit
				var got []broker.Lease
				for page := 0; ; page++ {
					if page > len(all) {
						t.Fatal("paging does not terminate")
					}
					leases, next, err := s.ListLeases(t.Context(), f)
					if err != nil {
						t.Fatal(err)
					}
					if len(leases) > limit {
						t.Fatalf("page of %d leases, limit %d", len(leases), limit)
					}
					got = append(got, leases...)
					if next == "" {
						break
					}
					if len(leases) != limit || next != leases[len(leases)-1].ID {
						t.Fatalf("next token %q after a page of %d ending %q", next, len(leases), ids(leases))
					}
					f.After = next
				}
				if !reflect.DeepEqual(ids(got), ids(want)) {
					t.Errorf("pages joined = %q, want %q", ids(got), ids(want))
				}
			})
		}
	}

	t.Run("after an id that does not exist", func(t *testing.T) {
		got, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{After: "lease-0145", Limit: 2})
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"lease-015", "lease-016"}; !slices.Equal(ids(got), want) {
			t.Errorf("got %q, want %q", ids(got), want)
		}
	})
	t.Run("negative limit", func(t *testing.T) {
		if _, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{Limit: -1}); !errors.Is(err, broker.ErrInvalidArgument) {
			t.Errorf("error %v, want ErrInvalidArgument", err)
		}
	})
}

func TestReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leases.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	leases := mustCreate(t, s,
		newLease("a", "ro", "svc", at(2*time.Minute)),
		newLease("b", "rw", "ops", at(1*time.Minute)),
	)
	b := leases[1]
	b.State, b.EndTime = broker.StateRevoked, at(time.Minute)
	leases[1] = mustUpdate(t, s, b)
	in := broker.Intent{LeaseID: "c", Target: "main", Username: "cb_c", ProxyRole: "ro_role", CreateTime: at(0)}
	if err := s.PutIntent(ctx, in); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(path, Options{})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	for _, want := range leases {
		assertLeaseEqual(t, mustGet(t, s, want.ID), want)
	}
	wantEntry := broker.ExpiryEntry{Expire: at(2 * time.Minute), LeaseID: "a", State: broker.StateActive, Target: "main", Username: "cb_ro_a"}
	if got := scanExpiry(t, s); !reflect.DeepEqual(got, []broker.ExpiryEntry{wantEntry}) {
		t.Errorf("ScanExpiry after reopen = %v", got)
	}
	intents, err := s.ListIntents(ctx)
	if err != nil || !reflect.DeepEqual(intents, []broker.Intent{in}) {
		t.Errorf("ListIntents after reopen = %+v, %v", intents, err)
	}
	checkIndexes(t, s)
	// Revisions carry on from the file, so a CAS based on a pre-restart
	// read still works.
	if got := mustUpdate(t, s, leases[0]); got.Revision != 2 {
		t.Errorf("revision after reopen and update = %d, want 2", got.Revision)
	}
}

// TestConcurrentUpdateLease races writers that each read, increment a
// counter and write back. Compare-and-set must give each revision exactly
// one winner, so the counter ends equal to the number of wins: no lost
// updates, even when Batch puts losers and the winner in one transaction.
func TestConcurrentUpdateLease(t *testing.T) {
	s := openStore(t)
	ctx := t.Context()
	mustCreate(t, s, newLease("hot", "ro", "svc", at(time.Minute)))

	const workers, wins = 8, 40
	var (
		mu        sync.Mutex
		winners   = map[uint64]int{} // revision -> worker that wrote it
		conflicts atomic.Int64
		wg        sync.WaitGroup
		start     = make(chan struct{})
	)
	for w := range workers {
		wg.Go(func() {
			<-start
			for {
				cur, err := s.GetLease(ctx, "hot")
				if err != nil {
					t.Errorf("GetLease: %v", err)
					return
				}
				if cur.RevokeAttempts >= wins {
					return
				}
				cur.RevokeAttempts++
				got, err := s.UpdateLease(ctx, cur)
				switch {
				case err == nil:
					mu.Lock()
					if prev, dup := winners[got.Revision]; dup {
						t.Errorf("revision %d won by workers %d and %d", got.Revision, prev, w)
					}
					winners[got.Revision] = w
					mu.Unlock()
				case errors.Is(err, broker.ErrConflict):
					conflicts.Add(1)
				default:
					t.Errorf("UpdateLease: %v", err)
					return
				}
			}
		})
	}
	close(start)
	wg.Wait()

	final := mustGet(t, s, "hot")
	if final.RevokeAttempts != wins || final.Revision != wins+1 {
		t.Errorf("final counter %d at revision %d, want %d at %d", final.RevokeAttempts, final.Revision, wins, wins+1)
	}
	for rev := uint64(2); rev <= wins+1; rev++ {
		if _, ok := winners[rev]; !ok {
			t.Errorf("revision %d has no winner", rev)
		}
	}
	if len(winners) != wins {
		t.Errorf("%d winning updates, want %d", len(winners), wins)
	}
	t.Logf("%d wins, %d conflicts", len(winners), conflicts.Load())
	checkIndexes(t, s)
}

func TestConcurrentCreateLease(t *testing.T) {
	const workers = 16
	tests := []struct {
		name     string
		id       func(w int) string
		wantWins int
	}{
		{"same id: one winner", func(int) string { return "contested" }, 1},
		{"distinct ids: all stored", func(w int) string { return fmt.Sprintf("w%02d", w) }, workers},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t)
			var (
				wins  atomic.Int64
				wg    sync.WaitGroup
				start = make(chan struct{})
			)
			for w := range workers {
				wg.Go(func() {
					l := newLease(tt.id(w), "ro", "svc", at(time.Duration(w)*time.Second))
					<-start
					switch err := s.CreateLease(t.Context(), &l); {
					case err == nil:
						wins.Add(1)
					case errors.Is(err, broker.ErrExists):
					default:
						t.Errorf("CreateLease: %v", err)
					}
				})
			}
			close(start)
			wg.Wait()
			if got := wins.Load(); got != int64(tt.wantWins) {
				t.Errorf("%d creates succeeded, want %d", got, tt.wantWins)
			}
			all, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{})
			if err != nil {
				t.Fatal(err)
			}
			if len(all) != tt.wantWins {
				t.Errorf("%d leases stored, want %d", len(all), tt.wantWins)
			}
			for _, l := range all {
				if l.Revision != 1 {
					t.Errorf("lease %s at revision %d after create", l.ID, l.Revision)
				}
			}
			checkIndexes(t, s)
		})
	}
}

// storeCalls exercises every method of broker.LeaseStore but Close.
var storeCalls = []struct {
	name string
	call func(ctx context.Context, s *Store) error
}{
	{"PutIntent", func(ctx context.Context, s *Store) error {
		return s.PutIntent(ctx, broker.Intent{LeaseID: "x", CreateTime: t0})
	}},
	{"DeleteIntent", func(ctx context.Context, s *Store) error { return s.DeleteIntent(ctx, "i") }},
	{"ListIntents", func(ctx context.Context, s *Store) error { _, err := s.ListIntents(ctx); return err }},
	{"CreateLease", func(ctx context.Context, s *Store) error {
		l := newLease("new", "ro", "svc", at(time.Minute))
		return s.CreateLease(ctx, &l)
	}},
	{"UpdateLease", func(ctx context.Context, s *Store) error {
		l := newLease("l", "ro", "svc", at(time.Hour))
		l.Revision = 1
		_, err := s.UpdateLease(ctx, l)
		return err
	}},
	{"GetLease", func(ctx context.Context, s *Store) error { _, err := s.GetLease(ctx, "l"); return err }},
	{"DeleteLease", func(ctx context.Context, s *Store) error { return s.DeleteLease(ctx, "l") }},
	{"ListLeases", func(ctx context.Context, s *Store) error {
		_, _, err := s.ListLeases(ctx, broker.LeaseFilter{})
		return err
	}},
	{"ScanExpiry", func(ctx context.Context, s *Store) error {
		return s.ScanExpiry(ctx, func(broker.ExpiryEntry) bool { return true })
	}},
	{"PurgeTombstones", func(ctx context.Context, s *Store) error {
		_, err := s.PurgeTombstones(ctx, at(time.Hour), 10)
		return err
	}},
}

func TestClosed(t *testing.T) {
	s := openStore(t)
	mustCreate(t, s, newLease("l", "ro", "svc", at(time.Minute)))
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for _, c := range storeCalls {
		t.Run(c.name, func(t *testing.T) {
			if err := c.call(t.Context(), s); !errors.Is(err, broker.ErrClosed) {
				t.Errorf("after Close: %v, want ErrClosed", err)
			}
		})
	}
	if _, err := s.Size(); !errors.Is(err, broker.ErrClosed) {
		t.Errorf("Size after Close: %v, want ErrClosed", err)
	}
}

func TestCanceledContext(t *testing.T) {
	s := openStore(t)
	mustCreate(t, s, newLease("l", "ro", "svc", at(time.Minute)))
	if err := s.PutIntent(t.Context(), broker.Intent{LeaseID: "i"}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	for _, c := range storeCalls {
		t.Run(c.name, func(t *testing.T) {
			if err := c.call(ctx, s); !errors.Is(err, context.Canceled) {
				t.Errorf("with a canceled context: %v, want context.Canceled", err)
			}
		})
	}
	// Nothing changed.
	assertLeaseEqual(t, mustGet(t, s, "l"), func() broker.Lease {
		l := newLease("l", "ro", "svc", at(time.Minute))
		l.Revision = 1
		return l
	}())
	if in, err := s.ListIntents(t.Context()); err != nil || len(in) != 1 {
		t.Errorf("intents after canceled calls: %+v, %v", in, err)
	}
}

// TestCloseWhileWriting closes the store under concurrent writers: each
// write either succeeds and survives a reopen, or fails with ErrClosed and
// leaves nothing behind.
func TestCloseWhileWriting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leases.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	const workers = 8
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		stored  []string
		written = make(chan struct{}, 1)
	)
	for w := range workers {
		wg.Go(func() {
			for i := 0; ; i++ {
				l := newLease(fmt.Sprintf("w%d-%06d", w, i), "ro", "svc", at(time.Duration(i)*time.Second))
				err := s.CreateLease(t.Context(), &l)
				if errors.Is(err, broker.ErrClosed) {
					return
				}
				if err != nil {
					t.Errorf("CreateLease: %v", err)
					return
				}
				mu.Lock()
				stored = append(stored, l.ID)
				n := len(stored)
				mu.Unlock()
				if n == 50 {
					written <- struct{}{}
				}
			}
		})
	}
	<-written
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wg.Wait()

	s, err = Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	all, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(stored)
	if got := ids(all); !slices.Equal(got, stored) {
		t.Errorf("after reopen %d leases, %d creates acknowledged", len(got), len(stored))
	}
	checkIndexes(t, s)
}

// TestScanExpiryEntryDetails checks that an expiry entry follows its
// lease's state, and that an entry written without details (files from
// before the index held them) is reported with only its id and time.
func TestScanExpiryEntryDetails(t *testing.T) {
	s := openStore(t)
	l := mustCreate(t, s, newLease("a", "ro", "svc", at(time.Minute)))[0]
	l.State = broker.StateRevoking
	if _, err := s.UpdateLease(t.Context(), l); err != nil {
		t.Fatal(err)
	}
	want := []broker.ExpiryEntry{{Expire: at(time.Minute), LeaseID: "a", State: broker.StateRevoking, Target: "main", Username: "cb_ro_a"}}
	if got := scanExpiry(t, s); !reflect.DeepEqual(got, want) {
		t.Errorf("ScanExpiry = %+v, want %+v", got, want)
	}
	// An entry as an older binary wrote it.
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketExpiry).Put(timeKey(at(time.Minute).UnixNano(), "a"), nil)
	}); err != nil {
		t.Fatal(err)
	}
	want = []broker.ExpiryEntry{{Expire: at(time.Minute), LeaseID: "a"}}
	if got := scanExpiry(t, s); !reflect.DeepEqual(got, want) {
		t.Errorf("ScanExpiry of an entry without details = %+v, want %+v", got, want)
	}
	// A damaged value is reported, not guessed at.
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketExpiry).Put(timeKey(at(time.Minute).UnixNano(), "a"), []byte{9})
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.ScanExpiry(t.Context(), func(broker.ExpiryEntry) bool { return true }); !errors.Is(err, errCorrupt) {
		t.Errorf("ScanExpiry over a damaged entry: %v, want errCorrupt", err)
	}
}
