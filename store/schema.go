package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// The on-disk layout. Everything that decides how the file is read is in this
// file, so a change to the layout is a change here and a schema version bump.
//
//	meta        "schema_version"              -> be64(version)
//	            "group_id"                    -> the broker group's id
//	                                             (broker.NewGroupID; written
//	                                             by the first GroupID call)
//	leases      lease id                      -> lease record (record.go)
//	intents     lease id                      -> intent record (record.go)
//	expiry      be64(expire unix ns) || id    -> state, flags, target, username
//	                                             (live leases only; empty in
//	                                             files written before the value
//	                                             existed: see encodeExpiryValue)
//	tombstones  be64(end unix ns) || id       -> empty   (terminal leases only)
//	activity    broker role name              -> be64(newest issue unix ns)
//	                                             (schema version 2 on)
//
// Index keys sort by time first because bbolt orders keys bytewise and a
// big-endian unsigned integer sorts like its value; the id suffix makes keys
// unique when two leases share an instant.

// schemaVersion is the layout this code writes. Open refuses a file with a
// higher version, so an older binary cannot silently misread a newer file.
//
//	1  meta, leases, intents, expiry, tombstones
//	2  adds activity; Open builds it from the leases of a version 1 file.
//	   An older binary would create leases without moving it forward,
//	   which is why it must refuse the file.
const schemaVersion uint64 = 2

var (
	bucketMeta       = []byte("meta")
	bucketLeases     = []byte("leases")
	bucketIntents    = []byte("intents")
	bucketExpiry     = []byte("expiry")
	bucketTombstones = []byte("tombstones")
	bucketActivity   = []byte("activity")

	allBuckets = [][]byte{bucketMeta, bucketLeases, bucketIntents, bucketExpiry, bucketTombstones, bucketActivity}

	metaKeySchemaVersion = []byte("schema_version")
	metaKeyGroupID       = []byte("group_id")
)

// Times are stored as unix nanoseconds. Zero means "no time" (time.Time{}),
// so real instants must be after the epoch (broker.MinStorableTime); that
// also keeps index keys, whose order is the unsigned order of the
// nanoseconds, in time order.

// timeNanos returns the stored form of t: 0 for the zero time, else unix
// nanoseconds. Instants the format cannot hold are an error rather than a
// silently wrapped value (broker.StorableTime).
func timeNanos(t time.Time) (int64, error) {
	st, err := broker.StorableTime(t)
	if err != nil || st.IsZero() {
		return 0, err
	}
	return st.UnixNano(), nil
}

// nanosTime is the inverse of timeNanos. Times come back in UTC with no
// monotonic reading, as any stored time must.
func nanosTime(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func leaseKey(id string) []byte { return []byte(id) }

// timeKey builds an expiry or tombstone key. n must be a value returned by
// timeNanos, hence not negative.
func timeKey(n int64, id string) []byte {
	k := make([]byte, 8, 8+len(id))
	binary.BigEndian.PutUint64(k, uint64(n))
	return append(k, id...)
}

var errBadTimeKey = errors.New("malformed index key")

// parseTimeKey splits an index key into its instant and lease id. The id is
// copied, so the result outlives the transaction.
func parseTimeKey(k []byte) (int64, string, error) {
	if len(k) <= 8 {
		return 0, "", fmt.Errorf("%w: %d bytes", errBadTimeKey, len(k))
	}
	n := binary.BigEndian.Uint64(k[:8])
	if n > math.MaxInt64 {
		return 0, "", fmt.Errorf("%w: time out of range", errBadTimeKey)
	}
	return int64(n), string(k[8:]), nil
}

// indexEntry is the one index key a lease record has: in bucketExpiry while
// the lease is live, in bucketTombstones once it is terminal.
type indexEntry struct {
	bucket []byte
	key    []byte
	val    []byte // nil for tombstones and for entries only to be deleted
}

// indexOf returns where the lease with these fields is indexed. A record in
// an unknown state (written by a newer binary) has no index entry.
//
// A live lease is indexed at the instant it needs attention: its expiry, or
// its end time when that is earlier (a revocation an admin asked for, still
// under way). So after a restart a revocation that was interrupted is
// resumed at once, not at the lease's expiry.
func indexOf(id string, state broker.LeaseState, expireNanos, endNanos int64) (indexEntry, bool) {
	switch {
	case state.Live():
		due := expireNanos
		if endNanos != 0 && endNanos < due {
			due = endNanos
		}
		return indexEntry{bucket: bucketExpiry, key: timeKey(due, id)}, true
	case state.Terminal():
		return indexEntry{bucket: bucketTombstones, key: timeKey(endNanos, id)}, true
	default:
		return indexEntry{}, false
	}
}

// activityKey is the key of a broker role's entry in bucketActivity. Role
// names are short identifiers the config validated; bbolt refuses an empty
// key, so the role "" has no entry.
func activityKey(role string) []byte { return []byte(role) }

// encodeActivity and decodeActivity are the value of an activity entry:
// the issue time of the role's newest lease, in the form timeNanos gives.
func encodeActivity(issueNanos int64) []byte {
	return binary.BigEndian.AppendUint64(nil, uint64(issueNanos))
}

func decodeActivity(b []byte) (int64, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("%w: activity entry of %d bytes", errCorrupt, len(b))
	}
	n := binary.BigEndian.Uint64(b)
	if n > math.MaxInt64 {
		return 0, fmt.Errorf("%w: activity entry out of range", errCorrupt)
	}
	return int64(n), nil
}

func encodeSchemaVersion(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func decodeSchemaVersion(b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("malformed schema version (%d bytes)", len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}
