package store

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The activity bucket remembers, for each broker role, the issue time of
// the newest lease ever created with it. The least-privilege check's stale
// test needs exactly that, and reading it from the leases themselves means
// reading every record: on a large store, mostly tombstones, that pulls the
// whole mmapped file into memory. The bucket holds one small entry per role
// name ever used, so reading it costs nothing.
//
// An entry only ever moves forward, in the transaction that creates the
// lease, and nothing deletes it: not DeleteLease, not PurgeTombstones.
// So it outlives the tombstones of the role's leases, and a role's last
// issue stays known after the retention has dropped them; the record-by-
// record scan it replaces forgot it. Entries of roles later removed from the
// configuration stay too; there are as many as role names ever configured.

// noteIssued moves role's activity entry forward to issueNanos (a value
// from timeNanos). It never moves it back, and a lease with no role or no
// issue time leaves nothing to remember. A damaged entry is overwritten:
// it only ever feeds a warning, and the new value is a true one.
func noteIssued(tx *bolt.Tx, role string, issueNanos int64) error {
	if role == "" || issueNanos == 0 {
		return nil
	}
	b := tx.Bucket(bucketActivity)
	key := activityKey(role)
	if v := b.Get(key); v != nil {
		if old, err := decodeActivity(v); err == nil && old >= issueNanos {
			return nil
		}
	}
	return b.Put(key, encodeActivity(issueNanos))
}

// LastIssued returns, for each broker role that ever had a lease in this
// store, the issue time of the newest one, whether that lease is still
// stored, a tombstone or already purged. A role with no lease is absent.
// For files written before the activity bucket existed, what Open found
// there when it built the bucket (see buildActivity) is the starting point.
func (s *Store) LastIssued(ctx context.Context) (map[string]time.Time, error) {
	out := map[string]time.Time{}
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketActivity).ForEach(func(k, v []byte) error {
			n, err := decodeActivity(v)
			if err != nil {
				return fmt.Errorf("activity of role %q: %w", k, err)
			}
			out[string(k)] = nanosTime(n)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// buildActivity fills the (empty) activity bucket from the leases a file
// written before it existed holds: the schema version 1 to 2 migration,
// run once by Open. Leases purged before then are gone and cannot count.
// It reads every record once; a record too damaged to decode is skipped
// and counted rather than failing Open, since the broker serves without it.
func buildActivity(tx *bolt.Tx, log *slog.Logger) error {
	newest := map[string]int64{}
	var damaged int
	err := tx.Bucket(bucketLeases).ForEach(func(k, v []byte) error {
		l, err := decodeLease(string(k), v)
		if err != nil {
			damaged++
			return nil
		}
		n, err := timeNanos(l.IssueTime)
		if err != nil {
			damaged++
			return nil
		}
		newest[l.Role] = max(newest[l.Role], n)
		return nil
	})
	if err != nil {
		return err
	}
	for role, n := range newest {
		if err := noteIssued(tx, role, n); err != nil {
			return fmt.Errorf("role %q: %w", role, err)
		}
	}
	if damaged > 0 {
		log.Warn("lease records skipped while building the role activity index: they cannot be decoded", "records", damaged)
	}
	return nil
}
