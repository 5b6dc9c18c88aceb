package etcd

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
)

// The change feed (broker.LeaseFeed). One watch covers the lease section
// and the stream section, which sort next to each other ("lease/" <
// "stream/", and no section lies between), so their changes come in one
// revision order. A follower scans both sections at one revision R, then
// watches from R+1:
//
//   - a watch that ends for any reason but compaction (the member lost
//     its leader: the watch runs WithRequireLeader, so a member cut off
//     from the cluster does not hold it silently; the connection broke
//     past the client's own retries) is opened again from the revision
//     after the last one delivered, which progress notifications move
//     forward while nothing changes;
//   - a watch whose next revision was compacted cannot be resumed without
//     a gap, so the follower scans again at the current revision and
//     delivers a FeedReset: the caller replaces what it knew, nothing is
//     lost silently.
//
// A record that does not decode is logged as an error and skipped; the
// scan of the next reset would fail on it the same way, so the broker
// learns of it from the log (and from the store's other reads), not from
// a feed that stops for every instance.

// Feed retry delays: after a failed scan or a watch that ended, the
// follower waits a random delay between feedRetryMin and a bound that
// doubles up to feedRetryMax, so a cluster that comes back is not met by
// every follower at once.
var (
	feedRetryMin = 50 * time.Millisecond
	feedRetryMax = 5 * time.Second
)

// testHookWatchStart, when set (by tests), is called with the revision each
// watch starts from, before it is opened.
var testHookWatchStart func(rev int64)

var _ broker.LeaseFeed = (*Store)(nil)

// FollowLeases implements broker.LeaseFeed.
func (s *Store) FollowLeases(ctx context.Context, fn func(broker.FeedEvent)) error {
	if err := s.alive(ctx); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.doneCtx, cancel)
	defer stop()
	failures := 0
	for {
		rev, err := s.feedReset(ctx, fn)
		if err != nil {
			if err := s.feedStopped(ctx); err != nil {
				return err
			}
			failures++
			s.log.Warn("etcd store: change feed scan failed; retrying", "err", err, "failures", failures)
			if err := s.feedWait(ctx, failures); err != nil {
				return err
			}
			continue
		}
		failures = 0
		next := rev + 1
		for {
			var err error
			next, err = s.feedWatch(ctx, next, fn)
			if err := s.feedStopped(ctx); err != nil {
				return err
			}
			if errors.Is(err, rpctypes.ErrCompacted) {
				s.log.Warn("etcd store: change feed fell behind a compaction; scanning again", "from_revision", next)
				break
			}
			failures++
			s.log.Warn("etcd store: change feed watch ended; resuming", "from_revision", next, "err", err, "failures", failures)
			if err := s.feedWait(ctx, failures); err != nil {
				return err
			}
		}
	}
}

// feedStopped is ErrClosed once the store is closed, ctx.Err() once ctx
// ended, else nil.
func (s *Store) feedStopped(ctx context.Context) error {
	select {
	case <-s.doneCtx.Done():
		return broker.ErrClosed
	default:
	}
	return ctx.Err()
}

// feedWait waits the backoff of the n-th consecutive failure.
func (s *Store) feedWait(ctx context.Context, n int) error {
	bound := feedRetryMin
	for i := 1; i < n && bound < feedRetryMax; i++ {
		bound *= 2
	}
	bound = min(bound, feedRetryMax)
	d := bound/2 + time.Duration(rand.Int64N(int64(bound/2)+1))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		if err := s.feedStopped(ctx); err != nil {
			return err
		}
		return ctx.Err()
	}
}

// feedReset scans the live leases and the stream marks at one revision,
// delivers them as a FeedReset and returns the revision.
func (s *Store) feedReset(ctx context.Context, fn func(broker.FeedEvent)) (int64, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return 0, err
	}
	var rev int64
	var leases []broker.Lease
	var marks []broker.StreamMark
	leaseFrom := s.keys.section(sectionLease)
	streamFrom := s.keys.section(sectionStream)
	err = s.consistent(ctx, "FollowLeases", func() { rev, leases, marks = 0, nil, nil }, func() error {
		err := s.scanRev(ctx, &rev, leaseFrom, clientv3.GetPrefixRangeEnd(leaseFrom), constPage(scanPage), func(kv *mvccpb.KeyValue) (bool, error) {
			l, err := decodeLease(s.keys.leaseID(kv.Key), kv.Value, kv.ModRevision)
			if err != nil {
				return false, err
			}
			if l.State.Live() {
				leases = append(leases, l)
			}
			return true, nil
		})
		if err != nil {
			return err
		}
		return s.scanRev(ctx, &rev, streamFrom, clientv3.GetPrefixRangeEnd(streamFrom), constPage(scanPage), func(kv *mvccpb.KeyValue) (bool, error) {
			if m, ok := s.keys.parseStream(kv.Key); ok {
				marks = append(marks, m)
			}
			return true, nil
		})
	})
	release()
	if err != nil {
		return 0, err
	}
	if rev == 0 {
		// Both sections empty: the scan read nothing, so ask for the
		// revision it would have read at.
		resp, err := s.get(ctx, s.keys.group(), clientv3.WithCountOnly())
		if err != nil {
			return 0, errRead("FollowLeases", err)
		}
		rev = resp.Header.Revision
	}
	fn(broker.FeedEvent{Kind: broker.FeedReset, Revision: uint64(rev), Leases: leases, Streams: marks})
	return rev, nil
}

// feedWatch watches the lease and stream sections from revision next and
// delivers their changes until the watch ends; it returns the revision to
// resume from and why it ended (rpctypes.ErrCompacted when it cannot be
// resumed from there).
func (s *Store) feedWatch(ctx context.Context, next int64, fn func(broker.FeedEvent)) (int64, error) {
	if testHookWatchStart != nil {
		testHookWatchStart(next)
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	from := s.keys.section(sectionLease)
	end := clientv3.GetPrefixRangeEnd(s.keys.section(sectionStream))
	wch := s.cli.Watch(wctx, from, clientv3.WithRange(end), clientv3.WithRev(next), clientv3.WithProgressNotify())
	for resp := range wch {
		if resp.CompactRevision != 0 {
			return next, rpctypes.ErrCompacted
		}
		if err := resp.Err(); err != nil {
			return next, err
		}
		for _, ev := range resp.Events {
			s.deliver(ev, fn)
			next = ev.Kv.ModRevision + 1
		}
		if len(resp.Events) == 0 && resp.Header.GetRevision() >= next {
			// A progress notification: nothing up to that revision.
			next = resp.Header.GetRevision() + 1
		}
	}
	if err := ctx.Err(); err != nil {
		return next, err
	}
	return next, errors.New("watch channel closed")
}

// deliver turns one watch event into a feed event.
func (s *Store) deliver(ev *clientv3.Event, fn func(broker.FeedEvent)) {
	kv := ev.Kv
	rev := uint64(kv.ModRevision)
	if m, ok := s.keys.parseStream(kv.Key); ok {
		kind := broker.FeedStreamOpen
		if ev.Type == clientv3.EventTypeDelete {
			kind = broker.FeedStreamClosed
		}
		fn(broker.FeedEvent{Kind: kind, Revision: rev, Stream: m})
		return
	}
	leasePrefix := s.keys.section(sectionLease)
	if len(kv.Key) <= len(leasePrefix) || string(kv.Key[:len(leasePrefix)]) != leasePrefix {
		return // a section this code does not know
	}
	id := s.keys.leaseID(kv.Key)
	if ev.Type == clientv3.EventTypeDelete {
		s.indexes.drop(id)
		fn(broker.FeedEvent{Kind: broker.FeedLeaseDeleted, Revision: rev, LeaseID: id})
		return
	}
	// Through the index cache: what other instances write, this one
	// then updates without a read (indexcache.go).
	l, err := s.decodeRead(id, kv.Value, kv.ModRevision)
	if err != nil {
		s.log.Error("etcd store: change feed skipped a lease record it cannot read", "lease_id", id, "revision", rev, "err", err)
		return
	}
	fn(broker.FeedEvent{Kind: broker.FeedLease, Revision: rev, Lease: l, Created: kv.CreateRevision == kv.ModRevision})
}

// alive is ErrClosed after Close, ctx.Err() when ctx is done.
func (s *Store) alive(ctx context.Context) error {
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	release()
	return nil
}
