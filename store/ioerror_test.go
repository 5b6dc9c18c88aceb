package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/tmpfs"
)

// TestWritesFailAndRecoverOnAFullDisk fills the file system under a real
// store: writes that need new pages fail with an error wrapping
// broker.ErrUnavailable (and ENOSPC), none of them half done; once the
// space is back the same store handle writes again, without a reopen, and
// the file is sound.
func TestWritesFailAndRecoverOnAFullDisk(t *testing.T) {
	fs := tmpfs.Mount(t, 2<<20)
	path := filepath.Join(fs.Dir, "leases.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	stored := map[string]bool{} // id -> CreateLease returned nil
	create := func(id string) error {
		l := newLease(id, "ro", "svc", at(time.Hour))
		l.Metadata = map[string]string{"pad": strings.Repeat("x", 512)} // grow the file quickly
		err := s.CreateLease(ctx, &l)
		if err == nil {
			stored[id] = true
		}
		return err
	}
	for i := range 50 {
		if err := create(fmt.Sprintf("before-%03d", i)); err != nil {
			t.Fatal(err)
		}
	}

	fs.Fill(t)
	// Group commits too: concurrent writes share one failing commit.
	var failed error
	for i := 0; failed == nil; i++ {
		if i == 2000 {
			t.Fatal("2000 leases written to a full disk: bbolt never needed a new page?")
		}
		var wg sync.WaitGroup
		errs := make([]error, 8)
		for j := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				l := newLease(fmt.Sprintf("full-%04d-%d", i, j), "ro", "svc", at(time.Hour))
				l.Metadata = map[string]string{"pad": strings.Repeat("x", 512)}
				errs[j] = s.CreateLease(ctx, &l)
			}()
		}
		wg.Wait()
		for j, err := range errs {
			id := fmt.Sprintf("full-%04d-%d", i, j)
			if err == nil {
				stored[id] = true
				continue
			}
			failed = err
			if _, gerr := s.GetLease(ctx, id); !errors.Is(gerr, broker.ErrLeaseNotFound) {
				t.Errorf("lease %s: its write failed but GetLease says %v", id, gerr)
			}
		}
	}
	if !errors.Is(failed, broker.ErrUnavailable) || !errors.Is(failed, syscall.ENOSPC) {
		t.Fatalf("write on a full disk: %v; want it to wrap broker.ErrUnavailable and ENOSPC", failed)
	}
	if strings.Contains(failed.Error(), fs.Dir) {
		t.Errorf("error %q names the store's path", failed)
	}
	// Other writes fail alike while the disk is full (or find a free page):
	// either way nothing half done.
	if err := s.PutIntent(ctx, broker.Intent{LeaseID: "intent-full", Username: "u"}); err != nil && !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("PutIntent on a full disk: %v; want ErrUnavailable", err)
	}

	fs.Free(t)
	for i := range 50 {
		if err := create(fmt.Sprintf("after-%03d", i)); err != nil {
			t.Fatalf("write after the space came back: %v", err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			return err
		}
		n := tx.Bucket(bucketLeases).Stats().KeyN
		if n != len(stored) {
			return fmt.Errorf("%d leases in the file, %d writes succeeded", n, len(stored))
		}
		for id := range stored {
			if tx.Bucket(bucketLeases).Get(leaseKey(id)) == nil {
				return fmt.Errorf("lease %s was acknowledged and is missing", id)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("file after the full disk: %v", err)
	}
}

// A read-only file system cannot be produced under a live store: Linux
// refuses to remount read-only while a file is open for writing, and bbolt
// holds its file so. The test says so rather than pass in silence; EROFS
// takes the same path as ENOSPC (any commit error is a storage failure).
func TestWritesFailAndRecoverOnAReadOnlyDisk(t *testing.T) {
	fs := tmpfs.Mount(t, 2<<20)
	s, err := Open(filepath.Join(fs.Dir, "leases.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	if err := fs.SetReadOnly(true); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			t.Skip("Linux refuses a read-only remount while the store's file is open for writing (EBUSY); a disk that turns read-only under bbolt (errors=remount-ro) cannot be staged on tmpfs")
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fs.SetReadOnly(false) })
	ctx := context.Background()
	l := newLease("ro-1", "ro", "svc", at(time.Hour))
	if err := s.CreateLease(ctx, &l); !errors.Is(err, broker.ErrUnavailable) || !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write on a read-only disk: %v; want ErrUnavailable wrapping EROFS", err)
	}
	if err := fs.SetReadOnly(false); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateLease(ctx, &l); err != nil {
		t.Fatalf("write once writable again: %v", err)
	}
}
