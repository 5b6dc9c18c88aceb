package store

import (
	"context"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// UpdateLeases is UpdateLease for many leases in one transaction (one
// commit, one fsync): the broker's renewal batcher writes every renewal
// that arrived together at once. Each lease is compared-and-set on its own:
// a lease that is missing (ErrLeaseNotFound) or was changed since it was
// read (ErrConflict) fails only its own entry. An error of the store itself
// fails every entry. A lease named twice succeeds at most once, since the
// first write moves its revision.
func (s *Store) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	out := make([]broker.Lease, len(ls))
	errs := make([]error, len(ls))
	type prepared struct {
		key, val []byte
		base     uint64
		idx      indexEntry
		ok       bool
	}
	preps := make([]prepared, len(ls))
	for i := range ls {
		l := ls[i]
		base := l.Revision
		l.Revision = base + 1
		val, head, err := encodeLease(&l)
		if err != nil {
			errs[i] = err
			continue
		}
		stored, err := decodeLease(l.ID, val)
		if err != nil {
			errs[i] = err
			continue
		}
		idx, _ := head.index(l.ID)
		out[i] = stored
		preps[i] = prepared{key: leaseKey(l.ID), val: val, base: base, idx: idx, ok: true}
	}
	// casErrs is reset at the start of every run: Batch may run fn again.
	casErrs := make([]error, len(ls))
	err := s.write(ctx, func(tx *bolt.Tx) error {
		clear(casErrs)
		leases := tx.Bucket(bucketLeases)
		for i, p := range preps {
			if !p.ok {
				continue
			}
			id := ls[i].ID
			old := leases.Get(p.key)
			if old == nil {
				casErrs[i] = fmt.Errorf("lease %q: %w", id, broker.ErrLeaseNotFound)
				continue
			}
			oldHead, _, err := decodeLeaseHead(old)
			if err != nil {
				casErrs[i] = fmt.Errorf("lease %q: %w", id, err)
				continue
			}
			if oldHead.revision != p.base {
				casErrs[i] = fmt.Errorf("lease %q: stored revision is %d, update was based on %d: %w",
					id, oldHead.revision, p.base, broker.ErrConflict)
				continue
			}
			if oldIdx, ok := oldHead.index(id); ok {
				if err := tx.Bucket(oldIdx.bucket).Delete(oldIdx.key); err != nil {
					return err
				}
			}
			if err := tx.Bucket(p.idx.bucket).Put(p.idx.key, p.idx.val); err != nil {
				return err
			}
			if err := leases.Put(p.key, p.val); err != nil {
				return err
			}
		}
		return nil
	})
	for i := range ls {
		switch {
		case errs[i] != nil:
		case err != nil:
			errs[i] = err
		default:
			errs[i] = casErrs[i]
		}
		if errs[i] != nil {
			out[i] = broker.Lease{}
		}
	}
	return out, errs
}
