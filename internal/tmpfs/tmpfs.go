// Package tmpfs gives tests a small file system of their own that can run
// out of space, for the store's whole-disk faults: a tmpfs mounted on a
// subdirectory of t.TempDir(), filled with a filler file and freed again.
// Mounting needs root (CAP_SYS_ADMIN); without it the test is skipped,
// saying so.
package tmpfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// FS is a mounted tmpfs. Dir is its root.
type FS struct {
	Dir    string
	filler string
}

// Mount mounts a tmpfs of size bytes on a new directory under t.TempDir()
// and unmounts it when the test ends, whether it passed or not (after the
// test's later cleanups, such as closing a store whose file is on it). It
// skips the test when the process may not mount.
func Mount(t testing.TB, size int64) *FS {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tmpfs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size))
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
		t.Skipf("cannot mount a tmpfs to fill up (%v): this test needs root or CAP_SYS_ADMIN, as in CI", err)
	}
	if err != nil {
		t.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			// A file still open on it (a store the test leaked): detach
			// it, so the mount goes with its last user.
			if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
				t.Errorf("unmount tmpfs %s: %v", dir, err)
			}
		}
	})
	return &FS{Dir: dir, filler: filepath.Join(dir, "filler")}
}

// Fill writes a filler file until the file system has no page left.
func (f *FS) Fill(t testing.TB) {
	t.Helper()
	fh, err := os.OpenFile(f.filler, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatalf("create filler: %v", err)
	}
	defer fh.Close()
	buf := make([]byte, 64<<10)
	for _, size := range []int{64 << 10, 4 << 10, 1} {
		for {
			_, err := fh.Write(buf[:size])
			if errors.Is(err, syscall.ENOSPC) {
				break
			}
			if err != nil {
				t.Fatalf("fill: %v", err)
			}
		}
	}
}

// Free removes the filler file: the space is back.
func (f *FS) Free(t testing.TB) {
	t.Helper()
	if err := os.Remove(f.filler); err != nil {
		t.Fatalf("remove filler: %v", err)
	}
}

// SetReadOnly remounts the file system read-only, or back to read-write.
// Linux refuses the read-only remount (EBUSY) while any file on it is open
// for writing, which is what a live store holds; the caller decides what
// that means for its test.
func (f *FS) SetReadOnly(ro bool) error {
	flags := uintptr(syscall.MS_REMOUNT)
	if ro {
		flags |= syscall.MS_RDONLY
	}
	return syscall.Mount("tmpfs", f.Dir, "tmpfs", flags, "")
}
