// Package migrate copies a broker group's lease store from one backend to
// another: a bbolt file into an etcd prefix, for a broker that moves from
// one machine to a highly available group (`brokerctl migrate`,
// docs/ha.md). It owns the order of the copy, what counts as the same
// record, and the check that everything arrived.
//
// It works at the store interface: it reads the source through
// broker.LeaseStore and broker.LastIssuedReader, as any broker would, and
// writes through the target's import methods, which keep etcd's limits
// (store/etcd/import.go). Every record of the source is copied: live
// leases, tombstones (revoked and expired leases kept for audit), intents
// (users being created when the broker stopped, which the new group's
// reconciler settles), the roles' last issue times and the group id, so
// the marker roles the old broker claimed stay the group's.
//
// A copy is resumable, not atomic: etcd caps one transaction at 128
// operations, so a store of any size is written in many. Each write puts a
// key only if it does not exist, and a key holding what the copy would
// write counts as done; so a copy cut off at any point is finished by
// running it again (Options.Resume), and a key holding anything else stops
// it with an error naming the key.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store/etcd"
)

// Source is the store copied from: the bbolt file, opened by the caller,
// who holds its lock for the whole copy so no broker writes meanwhile.
type Source interface {
	broker.LeaseStore
	broker.LastIssuedReader
}

// Target is the store copied into.
type Target interface {
	broker.LeaseStore
	broker.LastIssuedReader
	ImportGroupID(ctx context.Context, id string) error
	ImportIntents(ctx context.Context, ins []broker.Intent) (int, error)
	ImportLeases(ctx context.Context, ls []broker.Lease) (int, error)
	ImportLastIssued(ctx context.Context, last map[string]time.Time) error
	CountKeys(ctx context.Context) (etcd.KeyCounts, error)
}

var _ Target = (*etcd.Store)(nil)

// DefaultPageSize is how many leases Copy reads from the source, and
// hands to the target, at a time.
const DefaultPageSize = 1000

// ErrTargetNotEmpty is returned by Copy when the target holds keys and
// Options.Resume is not set, or holds another group's keys.
var ErrTargetNotEmpty = errors.New("the target is not empty")

// ErrMismatch is returned by Copy when the check after the copy finds the
// target different from the source.
var ErrMismatch = errors.New("the target differs from the source")

// Options tune Copy.
type Options struct {
	// Resume allows a target that holds keys, if they are this group's
	// (the target's group id is the source's): a copy that was cut off.
	// Records already there must equal the source's.
	Resume bool
	// PageSize is how many leases are read and written at a time
	// (default DefaultPageSize).
	PageSize int
	// Progress, when set, is called after each page with the leases
	// copied so far.
	Progress func(leases int)
}

// Report says what Copy found and did.
type Report struct {
	GroupID string
	// What the source holds: leases (Live + Terminal), intents, and roles
	// with a last issue time.
	Leases, Live, Terminal, Intents, Roles int
	// Written counts the records this run wrote; the rest were there
	// already from an earlier run.
	WrittenLeases, WrittenIntents int
}

// Copy copies every record of src into dst and then checks that dst
// holds exactly src's records: the key counts of each kind, and every
// lease, intent and last issue time field by field (revisions aside: each
// store numbers its own). See the package comment for what a failure
// leaves behind.
func Copy(ctx context.Context, src Source, dst Target, opts Options) (Report, error) {
	if opts.PageSize <= 0 {
		opts.PageSize = DefaultPageSize
	}
	var rep Report
	groupID, err := src.GroupID(ctx)
	if err != nil {
		return rep, fmt.Errorf("read the source's group id: %w", err)
	}
	rep.GroupID = groupID

	counts, err := dst.CountKeys(ctx)
	if err != nil {
		return rep, fmt.Errorf("read the target: %w", err)
	}
	if counts.All > 0 {
		if !opts.Resume {
			return rep, fmt.Errorf("%w: it holds %d keys (to finish a copy that was cut off, run it again with resume)", ErrTargetNotEmpty, counts.All)
		}
		// GroupID would create an id on a prefix without one: the
		// count says whether there is one, so a foreign prefix is
		// never written.
		if counts.Group == 0 {
			return rep, fmt.Errorf("%w: it holds %d keys but no group id, so they are not from an earlier copy", ErrTargetNotEmpty, counts.All)
		}
		theirs, err := dst.GroupID(ctx)
		if err != nil {
			return rep, fmt.Errorf("read the target's group id: %w", err)
		}
		if theirs != groupID {
			return rep, fmt.Errorf("%w: it belongs to broker group %s, the source to %s", ErrTargetNotEmpty, theirs, groupID)
		}
	}
	// The group id first: a copy cut off after it is recognisably this
	// group's, which is what Resume checks.
	if err := dst.ImportGroupID(ctx, groupID); err != nil {
		return rep, fmt.Errorf("copy the group id: %w", err)
	}

	intents, err := src.ListIntents(ctx)
	if err != nil {
		return rep, fmt.Errorf("read the source's intents: %w", err)
	}
	rep.Intents = len(intents)
	for chunk := range slices.Chunk(intents, opts.PageSize) {
		n, err := dst.ImportIntents(ctx, chunk)
		rep.WrittenIntents += n
		if err != nil {
			return rep, fmt.Errorf("copy intents: %w", err)
		}
	}

	after := ""
	for {
		page, next, err := src.ListLeases(ctx, broker.LeaseFilter{Limit: opts.PageSize, After: after})
		if err != nil {
			return rep, fmt.Errorf("read the source's leases: %w", err)
		}
		for i := range page {
			switch {
			case page[i].State.Live():
				rep.Live++
			case page[i].State.Terminal():
				rep.Terminal++
			}
		}
		rep.Leases += len(page)
		n, err := dst.ImportLeases(ctx, page)
		rep.WrittenLeases += n
		if err != nil {
			return rep, fmt.Errorf("copy leases: %w", err)
		}
		if opts.Progress != nil {
			opts.Progress(rep.Leases)
		}
		if next == "" {
			break
		}
		after = next
	}

	last, err := src.LastIssued(ctx)
	if err != nil {
		return rep, fmt.Errorf("read the source's last issue times: %w", err)
	}
	rep.Roles = len(last)
	if err := dst.ImportLastIssued(ctx, last); err != nil {
		return rep, fmt.Errorf("copy the last issue times: %w", err)
	}

	return rep, Verify(ctx, src, dst, opts.PageSize)
}

// Verify checks that dst holds exactly src's records: the number of keys
// of each kind, then every lease (in id order, both stores paged in step),
// every intent and every role's last issue time.
func Verify(ctx context.Context, src Source, dst Target, pageSize int) error {
	if pageSize <= 0 {
		pageSize = DefaultPageSize
	}
	want := etcd.KeyCounts{}
	intents, err := src.ListIntents(ctx)
	if err != nil {
		return fmt.Errorf("verify: read the source's intents: %w", err)
	}
	want.Intents = int64(len(intents))
	last, err := src.LastIssued(ctx)
	if err != nil {
		return fmt.Errorf("verify: read the source's last issue times: %w", err)
	}
	for role, t := range last {
		if role != "" && !t.IsZero() {
			want.LastIssued++
		}
	}

	// Leases, both sides in id order, a page at a time.
	var srcPage, dstPage []broker.Lease
	srcAfter, dstAfter := "", ""
	srcDone, dstDone := false, false
	refill := func(s broker.LeaseStore, page *[]broker.Lease, after *string, done *bool) error {
		if len(*page) > 0 || *done {
			return nil
		}
		p, next, err := s.ListLeases(ctx, broker.LeaseFilter{Limit: pageSize, After: *after})
		if err != nil {
			return err
		}
		*page, *after, *done = p, next, next == ""
		return nil
	}
	for {
		if err := refill(src, &srcPage, &srcAfter, &srcDone); err != nil {
			return fmt.Errorf("verify: read the source's leases: %w", err)
		}
		if err := refill(dst, &dstPage, &dstAfter, &dstDone); err != nil {
			return fmt.Errorf("verify: read the target's leases: %w", err)
		}
		if len(srcPage) == 0 && len(dstPage) == 0 {
			break
		}
		switch {
		case len(dstPage) == 0 || (len(srcPage) > 0 && srcPage[0].ID < dstPage[0].ID):
			return fmt.Errorf("%w: lease %s is missing from the target", ErrMismatch, srcPage[0].ID)
		case len(srcPage) == 0 || dstPage[0].ID < srcPage[0].ID:
			return fmt.Errorf("%w: the target holds lease %s, which the source does not", ErrMismatch, dstPage[0].ID)
		}
		if field := leaseDiff(srcPage[0], dstPage[0]); field != "" {
			return fmt.Errorf("%w: lease %s: %s differs", ErrMismatch, srcPage[0].ID, field)
		}
		switch l := srcPage[0]; {
		case l.State.Live():
			want.Expiry++
		case l.State.Terminal():
			want.Tombstones++
		}
		want.Leases++
		srcPage, dstPage = srcPage[1:], dstPage[1:]
	}

	got, err := dst.CountKeys(ctx)
	if err != nil {
		return fmt.Errorf("verify: count the target's keys: %w", err)
	}
	for _, c := range []struct {
		what      string
		want, got int64
	}{
		{"lease records", want.Leases, got.Leases},
		{"expiry index keys (live leases)", want.Expiry, got.Expiry},
		{"tombstone index keys (ended leases)", want.Tombstones, got.Tombstones},
		{"intents", want.Intents, got.Intents},
		{"roles' last issue times", want.LastIssued, got.LastIssued},
	} {
		if c.want != c.got {
			return fmt.Errorf("%w: %d %s in the source, %d in the target", ErrMismatch, c.want, c.what, c.got)
		}
	}

	theirs, err := dst.ListIntents(ctx)
	if err != nil {
		return fmt.Errorf("verify: read the target's intents: %w", err)
	}
	slices.SortFunc(intents, func(a, b broker.Intent) int { return compareStrings(a.LeaseID, b.LeaseID) })
	slices.SortFunc(theirs, func(a, b broker.Intent) int { return compareStrings(a.LeaseID, b.LeaseID) })
	for i := range intents {
		if !sameIntent(intents[i], theirs[i]) {
			return fmt.Errorf("%w: intent %s differs", ErrMismatch, intents[i].LeaseID)
		}
	}

	theirLast, err := dst.LastIssued(ctx)
	if err != nil {
		return fmt.Errorf("verify: read the target's last issue times: %w", err)
	}
	for _, role := range slices.Sorted(maps.Keys(last)) {
		if role == "" || last[role].IsZero() {
			continue
		}
		if !theirLast[role].Equal(last[role]) {
			return fmt.Errorf("%w: role %s: last issue time %s in the source, %s in the target",
				ErrMismatch, role, last[role].UTC().Format(time.RFC3339Nano), theirLast[role].UTC().Format(time.RFC3339Nano))
		}
	}

	ours, err := src.GroupID(ctx)
	if err != nil {
		return fmt.Errorf("verify: read the source's group id: %w", err)
	}
	if theirs, err := dst.GroupID(ctx); err != nil || theirs != ours {
		return fmt.Errorf("%w: group id %s in the source, %q in the target (%v)", ErrMismatch, ours, theirs, err)
	}
	return nil
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// leaseDiff names the first field in which a and b differ, or returns "".
// Revisions are each store's own; times compare as instants; nil and
// empty metadata are the same.
func leaseDiff(a, b broker.Lease) string {
	switch {
	case a.ID != b.ID:
		return "id"
	case a.Role != b.Role:
		return "role"
	case a.Client != b.Client:
		return "client"
	case a.Target != b.Target:
		return "target"
	case a.Username != b.Username:
		return "username"
	case a.ProxyRole != b.ProxyRole:
		return "proxy role"
	case !a.IssueTime.Equal(b.IssueTime):
		return "issue time"
	case !a.ExpireTime.Equal(b.ExpireTime):
		return "expire time"
	case !a.MaxExpireTime.Equal(b.MaxExpireTime):
		return "max expire time"
	case a.State != b.State:
		return "state"
	case !maps.Equal(a.Metadata, b.Metadata):
		return "metadata"
	case a.LastError != b.LastError:
		return "last error"
	case a.RevokeAttempts != b.RevokeAttempts:
		return "revoke attempts"
	case !a.NextAttempt.Equal(b.NextAttempt):
		return "next attempt"
	case !a.EndTime.Equal(b.EndTime):
		return "end time"
	case a.RevokeOnDisconnect != b.RevokeOnDisconnect:
		return "revoke on disconnect"
	case a.ValidUntilBehind != b.ValidUntilBehind:
		return "valid until behind"
	}
	return ""
}

func sameIntent(a, b broker.Intent) bool {
	return a.LeaseID == b.LeaseID && a.Target == b.Target && a.Username == b.Username &&
		a.ProxyRole == b.ProxyRole && a.CreateTime.Equal(b.CreateTime) && a.Group == b.Group
}
