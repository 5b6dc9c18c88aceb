package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/store"
)

// TestBackupWritesTheStoreAtomically: backup FILE replaces FILE with a
// bbolt file of mode 0600 that opens as a lease store holding the lease
// issued before it, leaving no temporary file; a failed backup leaves
// nothing.
func TestBackupWritesTheStoreAtomically(t *testing.T) {
	t.Parallel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfgPath, _ := checkConfig(t, tg, "")
	b := &testBroker{addr: serveConfig(t, cfgPath), target: tg}
	issued := fields(b.ok(t, "issue", "read_only"))

	dir := t.TempDir()
	path := filepath.Join(dir, "leases.db")
	if err := os.WriteFile(path, []byte("an older backup"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := fields(b.ok(t, "backup", path))
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if out["file"] != path || out["format"] != "bbolt" || out["bytes"] != strconv.FormatInt(fi.Size(), 10) {
		t.Errorf("backup printed %q; the file has %d bytes", out, fi.Size())
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("backup file mode %v, want 0600", fi.Mode().Perm())
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("backup left %d files in its directory, want 1", len(entries))
	}
	s, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatalf("the backup does not open as a lease store: %v", err)
	}
	defer s.Close()
	if l, err := s.GetLease(context.Background(), issued["lease_id"]); err != nil || l.Username != issued["username"] {
		t.Errorf("the backup's lease %s: %+v, %v", issued["lease_id"], l, err)
	}

	r := ctl(t, "--addr", b.addr, "backup", filepath.Join(dir, "missing", "leases.db"))
	if r.code != 1 || !strings.Contains(r.stderr, "missing") {
		t.Errorf("backup into a missing directory: exit %d, stderr %q", r.code, r.stderr)
	}
	// Started without a configuration file, the broker refuses reloads.
	r = ctl(t, "--addr", b.addr, "reload")
	if r.code != 1 || !strings.Contains(r.stderr, "FailedPrecondition") {
		t.Errorf("reload: exit %d, stderr %q", r.code, r.stderr)
	}
}
