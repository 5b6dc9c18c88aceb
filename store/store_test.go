package store

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store/storetest"
)

// The lease fixtures are the contract suite's (store_contract_test.go), so
// these tests build leases as it does.
var (
	t0         = storetest.T0
	newLease   = storetest.NewLease
	mustCreate = storetest.MustCreate
	mustGet    = storetest.MustGet
	mustUpdate = storetest.MustUpdate
	scanExpiry = storetest.ScanExpiry
	ids        = storetest.IDs
)

func at(d time.Duration) time.Time { return t0.Add(d) }

// openStore opens a store in a fresh directory and closes it at the end of
// the test.
func openStore(t *testing.T) *Store {
	t.Helper()
	return openStoreAt(t, filepath.Join(t.TempDir(), "leases.db"))
}

// openStoreAt opens the store at path and closes it at the end of the
// test. Tests skip fsync: durability is bbolt's, not under test here.
func openStoreAt(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
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
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Size(); !errors.Is(err, broker.ErrClosed) {
			t.Errorf("Size after Close: %v, want ErrClosed", err)
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

// TestLongIDRejected: bbolt keys are bounded here, so a buggy or hostile id
// cannot become a huge key.
func TestLongIDRejected(t *testing.T) {
	s := openStore(t)
	l := newLease(strings.Repeat("x", broker.MaxLeaseIDLen+1), "ro", "svc", at(time.Minute))
	if err := s.CreateLease(t.Context(), &l); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Fatalf("CreateLease of a %d-byte id: %v, want ErrInvalidArgument", len(l.ID), err)
	}
	l.ID = l.ID[:broker.MaxLeaseIDLen]
	mustCreate(t, s, l)
	checkIndexes(t, s)
}

// TestRevisionsAndIndexes follows the bbolt store's own bookkeeping through
// every kind of write, beyond what the contract suite (storetest) can see:
// revisions count 1, 2, 3... per lease, times come back in UTC, and after
// each write the indexes hold exactly one key per lease (checkIndexes).
func TestRevisionsAndIndexes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leases.db")
	s := openStoreAt(t, path)
	ctx := t.Context()
	local := newLease("a", "ro", "svc", time.Date(2030, 5, 6, 7, 8, 9, 10, time.FixedZone("CEST", 2*3600)))
	local.Revision = 77 // callers cannot choose the first revision
	created := mustCreate(t, s, local, newLease("b", "ro", "svc", at(time.Minute)), newLease("c", "rw", "svc", at(2*time.Minute)))
	for _, l := range created {
		if l.Revision != 1 {
			t.Errorf("lease %s created at revision %d, want 1", l.ID, l.Revision)
		}
	}
	if loc := mustGet(t, s, "a").ExpireTime.Location(); loc != time.UTC {
		t.Errorf("stored times come back in %v, want UTC", loc)
	}
	checkIndexes(t, s)

	bad := newLease("b", "ro", "svc", at(time.Hour)) // taken
	if err := s.CreateLease(ctx, &bad); !errors.Is(err, broker.ErrExists) {
		t.Fatalf("CreateLease of a taken id: %v", err)
	}
	checkIndexes(t, s)

	a := created[0]
	a.State, a.EndTime = broker.StateRevoking, at(30*time.Second)
	a = mustUpdate(t, s, a)
	a.State = broker.StateRevoked
	a = mustUpdate(t, s, a)
	if a.Revision != 3 {
		t.Errorf("revision after two updates = %d, want 3", a.Revision)
	}
	checkIndexes(t, s)

	b, c := created[1], created[2]
	b.ExpireTime = at(time.Hour)
	c.State, c.EndTime = broker.StateExpired, at(time.Minute)
	stale := created[0]
	got, errs := s.UpdateLeases(ctx, []broker.Lease{b, c, stale})
	if errs[0] != nil || errs[1] != nil || !errors.Is(errs[2], broker.ErrConflict) {
		t.Fatalf("UpdateLeases errors %v", errs)
	}
	if got[0].Revision != 2 || got[1].Revision != 2 {
		t.Errorf("UpdateLeases revisions %d, %d; want 2, 2", got[0].Revision, got[1].Revision)
	}
	checkIndexes(t, s)

	// A tombstone brought back to life leaves the tombstone index.
	c = got[1]
	c.State = broker.StateRevokeFailed
	mustUpdate(t, s, c)
	checkIndexes(t, s)

	if n, err := s.PurgeTombstones(ctx, at(time.Hour), 10); err != nil || n != 1 {
		t.Fatalf("PurgeTombstones = %d, %v; want 1", n, err)
	}
	checkIndexes(t, s)
	if err := s.DeleteLease(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	checkIndexes(t, s)

	// Revisions carry on from the file.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStoreAt(t, path)
	if b := mustUpdate(t, s, got[0]); b.Revision != 3 {
		t.Errorf("revision after reopen and update = %d, want 3", b.Revision)
	}
	checkIndexes(t, s)
}

// TestDeleteDamagedLease: a record that no longer decodes cannot say where
// it is indexed; DeleteLease still removes it, and searches both indexes
// for its id, so corruption can be cleaned up.
func TestDeleteDamagedLease(t *testing.T) {
	s := openStore(t)
	mustCreate(t, s, newLease("keep", "ro", "svc", at(time.Minute)))
	err := s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketLeases).Put([]byte("broken"), []byte{leaseFormat1, 1, 1}); err != nil {
			return err
		}
		return tx.Bucket(bucketExpiry).Put(timeKey(at(0).UnixNano(), "broken"), nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteLease(t.Context(), "broken"); err != nil {
		t.Fatalf("DeleteLease: %v", err)
	}
	if _, err := s.GetLease(t.Context(), "broken"); !errors.Is(err, broker.ErrLeaseNotFound) {
		t.Errorf("GetLease after delete: %v, want ErrLeaseNotFound", err)
	}
	checkIndexes(t, s)
	mustGet(t, s, "keep")
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
