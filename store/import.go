package store

import (
	"context"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// importTxSize bounds the leases ImportLeases writes per transaction, so
// that one import never holds the write lock, or dirties memory, without
// bound.
const importTxSize = 10_000

// ImportLeases stores leases as given, in any state, each at revision 1
// and indexed as CreateLease and UpdateLease would index it, many per
// transaction, moving each role's last issue time forward as CreateLease
// does. A lease whose id is already stored fails the import with
// broker.ErrExists; transactions committed before it stay. It is for
// restoring an export and for building test and benchmark stores (see
// cmd/credbroker-bench); the broker never calls it.
func (s *Store) ImportLeases(ctx context.Context, ls []broker.Lease) error {
	for len(ls) > 0 {
		part := ls[:min(len(ls), importTxSize)]
		ls = ls[len(part):]
		type rec struct {
			key, val []byte
			idx      indexEntry
			indexed  bool
		}
		recs := make([]rec, len(part))
		newest := map[string]int64{} // role -> issue time, for the activity bucket
		for i := range part {
			l := part[i]
			l.Revision = 1
			val, head, err := encodeLease(&l)
			if err != nil {
				return fmt.Errorf("lease %q: %w", l.ID, err)
			}
			issue, err := timeNanos(l.IssueTime) // encodeLease checked it
			if err != nil {
				return fmt.Errorf("lease %q: %w", l.ID, err)
			}
			newest[l.Role] = max(newest[l.Role], issue)
			idx, ok := head.index(l.ID)
			recs[i] = rec{key: leaseKey(l.ID), val: val, idx: idx, indexed: ok}
		}
		err := s.update(ctx, func(tx *bolt.Tx) error {
			leases := tx.Bucket(bucketLeases)
			for _, r := range recs {
				if leases.Get(r.key) != nil {
					return fmt.Errorf("lease %q: %w", r.key, broker.ErrExists)
				}
				if err := leases.Put(r.key, r.val); err != nil {
					return err
				}
				if r.indexed {
					if err := tx.Bucket(r.idx.bucket).Put(r.idx.key, r.idx.val); err != nil {
						return err
					}
				}
			}
			for role, issue := range newest {
				if err := noteIssued(tx, role, issue); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}
