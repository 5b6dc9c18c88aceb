package store

import (
	"fmt"
	"os"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// compactTxSize is how many bytes a compaction copies per transaction of
// the destination file.
const compactTxSize = 64 << 20

// CompactCopy writes a compacted copy of the store to dst (a new file, mode
// 0600): every bucket rewritten in key order with full pages and no free
// pages. Its size is what the live leases, tombstones and indexes need,
// which is what the file's growth is measured against. It reads one
// consistent snapshot per transaction of compactTxSize bytes while the
// store keeps serving.
func (s *Store) CompactCopy(dst string) (int64, error) {
	if s.closed.Load() {
		return 0, broker.ErrClosed
	}
	out, err := bolt.Open(dst, 0o600, &bolt.Options{NoSync: true})
	if err != nil {
		return 0, fmt.Errorf("compact lease store: %w", err)
	}
	if err := bolt.Compact(out, s.db, compactTxSize); err != nil {
		_ = out.Close()
		return 0, fmt.Errorf("compact lease store: %w", err)
	}
	if err := out.Sync(); err != nil {
		_ = out.Close()
		return 0, fmt.Errorf("compact lease store: %w", err)
	}
	if err := out.Close(); err != nil {
		return 0, fmt.Errorf("compact lease store: %w", err)
	}
	fi, err := os.Stat(dst)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}
