package broker

import (
	"fmt"
	"math"
	"time"
)

// What every LeaseStore accepts, whatever its backend: one set of rules,
// so that bbolt, the in-memory store and etcd refuse the same leases with
// the same ErrInvalidArgument (store/storetest checks it).

// MaxLeaseIDLen bounds lease ids. Real ids are short random strings; the
// bound keeps a key any backend can index.
const MaxLeaseIDLen = 256

// Stored instants are unix nanoseconds in an int64: UnixNano wraps
// silently outside these bounds (year 1000 comes out positive), so every
// conversion checks them first.
var (
	MinStorableTime = time.Unix(0, 1)
	MaxStorableTime = time.Unix(0, math.MaxInt64)
)

// CheckLeaseID refuses an empty or over-long lease id.
func CheckLeaseID(id string) error {
	if id == "" {
		return fmt.Errorf("%w: empty lease id", ErrInvalidArgument)
	}
	if len(id) > MaxLeaseIDLen {
		return fmt.Errorf("%w: lease id longer than %d bytes", ErrInvalidArgument, MaxLeaseIDLen)
	}
	return nil
}

// StorableTime returns t as a store gives it back: the zero time, or the
// same instant in UTC without a monotonic reading. An instant outside
// MinStorableTime..MaxStorableTime is ErrInvalidArgument.
func StorableTime(t time.Time) (time.Time, error) {
	if t.IsZero() {
		return time.Time{}, nil
	}
	if t.Before(MinStorableTime) || t.After(MaxStorableTime) {
		return time.Time{}, fmt.Errorf("%w: time %s is outside what the store can hold (after 1970, before 2262)",
			ErrInvalidArgument, t.UTC().Format(time.RFC3339Nano))
	}
	return time.Unix(0, t.UnixNano()).UTC(), nil
}

// CheckStorable refuses a lease no store may write: a bad id, a state
// that is neither live nor terminal, an instant out of range, a live
// lease without an expire time or a terminal one without an end time
// (the index key of each; without it the lease would be invisible to the
// expiry manager or to retention), or revoke attempts out of int32 range
// (so that every record decodes on a 32-bit build too), and the same for
// the usage's session counts.
func CheckStorable(l *Lease) error {
	if err := CheckLeaseID(l.ID); err != nil {
		return err
	}
	if !l.State.Live() && !l.State.Terminal() {
		return fmt.Errorf("%w: lease %q: state %s cannot be stored", ErrInvalidArgument, l.ID, l.State)
	}
	for _, t := range []time.Time{l.IssueTime, l.ExpireTime, l.MaxExpireTime, l.NextAttempt, l.EndTime,
		l.Usage.FirstSeen, l.Usage.LastSeen, l.Usage.LastQueryStart} {
		if _, err := StorableTime(t); err != nil {
			return fmt.Errorf("lease %q: %w", l.ID, err)
		}
	}
	if l.State.Live() && l.ExpireTime.IsZero() {
		return fmt.Errorf("%w: lease %q: %s lease without an expire time", ErrInvalidArgument, l.ID, l.State)
	}
	if l.State.Terminal() && l.EndTime.IsZero() {
		return fmt.Errorf("%w: lease %q: %s lease without an end time", ErrInvalidArgument, l.ID, l.State)
	}
	if l.RevokeAttempts < 0 || l.RevokeAttempts > math.MaxInt32 {
		return fmt.Errorf("%w: lease %q: revoke attempts %d out of range", ErrInvalidArgument, l.ID, l.RevokeAttempts)
	}
	for _, n := range []int{l.Usage.Sessions, l.Usage.PeakSessions, l.Usage.SessionsSeen} {
		if n < 0 || n > math.MaxInt32 {
			return fmt.Errorf("%w: lease %q: session count %d out of range", ErrInvalidArgument, l.ID, n)
		}
	}
	return nil
}

// PurgeCutoff is endedBefore in unix nanoseconds, clamped to the range a
// stored instant can have, for comparison with stored end times.
func PurgeCutoff(endedBefore time.Time) int64 {
	switch {
	case endedBefore.After(MaxStorableTime):
		return math.MaxInt64
	case endedBefore.Before(MinStorableTime):
		return 0
	default:
		return endedBefore.UnixNano()
	}
}
