package store

import (
	"bytes"
	"context"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// ctxCheckEvery is how many rows a long scan reads between checks of its
// context: often enough to stop promptly, rarely enough to cost nothing.
const ctxCheckEvery = 4096

// CreateLease stores a new lease with revision 1 and deletes the intent of
// the same id in the same transaction, so a crash leaves either the intent
// (and the reconciler drops the user) or the lease, never neither. The same
// transaction moves its role's last issue time forward (see LastIssued).
func (s *Store) CreateLease(ctx context.Context, l *broker.Lease) error {
	if l == nil {
		return fmt.Errorf("%w: nil lease", broker.ErrInvalidArgument)
	}
	rec := *l
	rec.Revision = 1
	val, head, err := encodeLease(&rec)
	if err != nil {
		return err
	}
	issue, err := timeNanos(rec.IssueTime) // encodeLease checked it
	if err != nil {
		return err
	}
	key := leaseKey(rec.ID)
	idx, _ := head.index(rec.ID)
	err = s.write(ctx, func(tx *bolt.Tx) error {
		leases := tx.Bucket(bucketLeases)
		if leases.Get(key) != nil {
			return fmt.Errorf("lease %q: %w", rec.ID, broker.ErrExists)
		}
		if err := leases.Put(key, val); err != nil {
			return err
		}
		if err := tx.Bucket(idx.bucket).Put(idx.key, idx.val); err != nil {
			return err
		}
		if err := noteIssued(tx, rec.Role, issue); err != nil {
			return err
		}
		return tx.Bucket(bucketIntents).Delete(key)
	})
	if err != nil {
		return err
	}
	l.Revision = rec.Revision
	return nil
}

// UpdateLease replaces the stored lease if its revision is still l.Revision,
// moving its index entry when the state or the relevant time changed. It
// returns the lease as a later GetLease would.
func (s *Store) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	base := l.Revision
	l.Revision = base + 1
	val, head, err := encodeLease(&l)
	if err != nil {
		return broker.Lease{}, err
	}
	// Decoding what will be written, rather than returning l, normalises
	// the result (UTC times, no monotonic clock, nil empty metadata)
	// exactly as a read would; and it keeps the Batch function free of
	// result variables.
	stored, err := decodeLease(l.ID, val)
	if err != nil {
		return broker.Lease{}, err
	}
	key := leaseKey(l.ID)
	idx, _ := head.index(l.ID)
	err = s.write(ctx, func(tx *bolt.Tx) error {
		leases := tx.Bucket(bucketLeases)
		old := leases.Get(key)
		if old == nil {
			return fmt.Errorf("lease %q: %w", l.ID, broker.ErrLeaseNotFound)
		}
		oldHead, _, err := decodeLeaseHead(old)
		if err != nil {
			return fmt.Errorf("lease %q: %w", l.ID, err)
		}
		if oldHead.revision != base {
			return fmt.Errorf("lease %q: stored revision is %d, update was based on %d: %w",
				l.ID, oldHead.revision, base, broker.ErrConflict)
		}
		if oldIdx, ok := oldHead.index(l.ID); ok {
			if err := tx.Bucket(oldIdx.bucket).Delete(oldIdx.key); err != nil {
				return err
			}
		}
		if err := tx.Bucket(idx.bucket).Put(idx.key, idx.val); err != nil {
			return err
		}
		return leases.Put(key, val)
	})
	if err != nil {
		return broker.Lease{}, err
	}
	return stored, nil
}

// GetLease returns the lease with that id, or broker.ErrLeaseNotFound.
func (s *Store) GetLease(ctx context.Context, id string) (broker.Lease, error) {
	var l broker.Lease
	err := s.view(ctx, func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketLeases).Get(leaseKey(id))
		if v == nil {
			return fmt.Errorf("lease %q: %w", id, broker.ErrLeaseNotFound)
		}
		var err error
		l, err = decodeLease(id, v)
		return err
	})
	if err != nil {
		return broker.Lease{}, err
	}
	return l, nil
}

// DeleteLease removes a lease and its index entry. A missing lease is not an
// error. A record too damaged to say where it is indexed is still removed,
// with both indexes searched for its id, so corruption can be cleaned up.
func (s *Store) DeleteLease(ctx context.Context, id string) error {
	key := leaseKey(id)
	return s.write(ctx, func(tx *bolt.Tx) error {
		leases := tx.Bucket(bucketLeases)
		old := leases.Get(key)
		if old == nil {
			return nil
		}
		head, _, err := decodeLeaseHead(old)
		if err != nil {
			if err := scrubIndexes(tx, id); err != nil {
				return err
			}
		} else if idx, ok := head.index(id); ok {
			if err := tx.Bucket(idx.bucket).Delete(idx.key); err != nil {
				return err
			}
		}
		return leases.Delete(key)
	})
}

// scrubIndexes deletes every index key naming id. It reads both indexes
// whole, so it is only for records whose own fields cannot be trusted.
func scrubIndexes(tx *bolt.Tx, id string) error {
	for _, name := range [][]byte{bucketExpiry, bucketTombstones} {
		b := tx.Bucket(name)
		var doomed [][]byte
		_ = b.ForEach(func(k, _ []byte) error {
			if len(k) > 8 && string(k[8:]) == id {
				doomed = append(doomed, bytes.Clone(k))
			}
			return nil
		})
		for _, k := range doomed {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
	}
	return nil
}

// ListLeases returns the leases matching f in ascending id order. When
// f.Limit leases were returned and more match, the second result is the id
// of the last one, to pass as f.After for the next page; otherwise it is "".
//
// Pages are separate transactions: a lease that exists for the whole listing
// appears exactly once, one created or deleted meanwhile may or may not.
func (s *Store) ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error) {
	if f.Limit < 0 {
		return nil, "", fmt.Errorf("%w: negative list limit %d", broker.ErrInvalidArgument, f.Limit)
	}
	var (
		out  []broker.Lease
		next string
	)
	err := s.view(ctx, func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketLeases).Cursor()
		var k, v []byte
		if f.After == "" {
			k, v = c.First()
		} else {
			after := leaseKey(f.After)
			k, v = c.Seek(after)
			if k != nil && bytes.Equal(k, after) {
				k, v = c.Next()
			}
		}
		seen := 0
		for ; k != nil; k, v = c.Next() {
			seen++
			if seen%ctxCheckEvery == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			// Filtering reads only the head of each record, so a
			// selective listing over a large store decodes little.
			head, _, err := decodeLeaseHead(v)
			if err != nil {
				return fmt.Errorf("lease %q: %w", k, err)
			}
			if !head.matches(&f) {
				continue
			}
			if f.Limit > 0 && len(out) == f.Limit {
				next = out[len(out)-1].ID
				return nil
			}
			l, err := decodeLease(string(k), v)
			if err != nil {
				return err
			}
			out = append(out, l)
		}
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	return out, next, nil
}

// ScanExpiry calls fn for each live lease in ascending expire-time order
// (ties in id order) until fn returns false. It reads the expiry index only,
// never the lease records, so rebuilding the expiry heap at start-up, and
// reconciliation, cost one pass over small entries (which also hold each
// lease's state, target and username; empty in entries written before).
//
// fn runs inside a read transaction over one consistent snapshot. It must be
// quick and must not call the Store: a write from fn can deadlock against
// the open transaction.
func (s *Store) ScanExpiry(ctx context.Context, fn func(broker.ExpiryEntry) bool) error {
	return s.view(ctx, func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketExpiry).Cursor()
		seen := 0
		for k, v := c.First(); k != nil; k, v = c.Next() {
			seen++
			if seen%ctxCheckEvery == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			n, id, err := parseTimeKey(k)
			if err != nil {
				return fmt.Errorf("expiry index: %w", err)
			}
			e := broker.ExpiryEntry{Expire: nanosTime(n), LeaseID: id}
			if err := decodeExpiryValue(v, &e); err != nil {
				return fmt.Errorf("expiry index entry of lease %q: %w", id, err)
			}
			if !fn(e) {
				return nil
			}
		}
		return nil
	})
}

// PurgeTombstones deletes up to limit terminal leases that ended before
// endedBefore, oldest first, in one transaction, and returns how many lease
// records it deleted. limit must be positive: one unbounded transaction
// could hold the write lock, and grow the file, for as long as it likes.
// Roles' last issue times (LastIssued) are kept: they are what remains of
// the purged leases for the stale check.
func (s *Store) PurgeTombstones(ctx context.Context, endedBefore time.Time, limit int) (int, error) {
	if limit <= 0 {
		return 0, fmt.Errorf("%w: purge limit must be positive, got %d", broker.ErrInvalidArgument, limit)
	}
	cutoff := broker.PurgeCutoff(endedBefore)
	var purged int
	err := s.update(ctx, func(tx *bolt.Tx) error {
		purged = 0
		tombstones := tx.Bucket(bucketTombstones)
		leases := tx.Bucket(bucketLeases)

		// Collect first: deleting under a live bbolt cursor skips keys.
		var doomed [][]byte
		c := tombstones.Cursor()
		for k, _ := c.First(); k != nil && len(doomed) < limit; k, _ = c.Next() {
			end, _, err := parseTimeKey(k)
			if err != nil {
				return fmt.Errorf("tombstone index: %w", err)
			}
			if end >= cutoff {
				break
			}
			doomed = append(doomed, bytes.Clone(k))
		}

		for _, k := range doomed {
			id := k[8:]
			if v := leases.Get(id); v != nil {
				head, _, err := decodeLeaseHead(v)
				if err == nil && !head.state.Terminal() {
					// The index says terminal, the record says live:
					// keep the record, whose user may still exist, and
					// drop only the stale index key.
					s.log.Warn("tombstone index names a live lease; keeping the lease", "lease_id", string(id), "state", head.state.String())
				} else {
					if err := leases.Delete(id); err != nil {
						return err
					}
					purged++
				}
			}
			if err := tombstones.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return purged, nil
}
