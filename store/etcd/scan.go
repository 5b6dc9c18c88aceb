package etcd

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
)

// scanAt reads the keys in [from, end) in order, in range reads of at most
// page() keys, all at the revision of the first, and calls visit for each
// until it returns false. If that revision is compacted meanwhile, the
// error is rpctypes.ErrCompacted.
func (s *Store) scanAt(ctx context.Context, from, end string, page func() int64, visit func(kv *mvccpb.KeyValue) (bool, error)) error {
	var rev int64
	return s.scanRev(ctx, &rev, from, end, page, visit)
}

// scanRev is scanAt at revision *rev; when *rev is 0 it reads at the
// revision of its first range read and sets *rev to it, so that a second
// scan can read another range at the same revision.
func (s *Store) scanRev(ctx context.Context, revp *int64, from, end string, page func() int64, visit func(kv *mvccpb.KeyValue) (bool, error)) error {
	rev := *revp
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(max(page(), 1))}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := s.get(ctx, from, opts...)
		if err != nil {
			return err
		}
		if rev == 0 {
			rev = resp.Header.Revision
			*revp = rev
		}
		for _, kv := range resp.Kvs {
			if more, err := visit(kv); err != nil || !more {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		if testHookPage != nil {
			testHookPage()
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// consistent runs a scan (reset, then scan) and runs it again from the
// start when the revision it read at was compacted meanwhile, so that its
// result still comes from one revision.
func (s *Store) consistent(ctx context.Context, op string, reset func(), scan func() error) error {
	for attempt := 0; ; attempt++ {
		reset()
		err := scan()
		if errors.Is(err, rpctypes.ErrCompacted) && attempt < maxScanRestarts && ctx.Err() == nil {
			s.log.Warn("etcd store: scan restarted, its revision was compacted", "op", op, "attempt", attempt+1)
			continue
		}
		if err != nil {
			return errRead(op, err)
		}
		return nil
	}
}

func constPage(n int64) func() int64 { return func() int64 { return n } }

// ListIntents reads the intent keys at one revision.
func (s *Store) ListIntents(ctx context.Context) ([]broker.Intent, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	from := s.keys.section(sectionIntent)
	var out []broker.Intent
	err = s.consistent(ctx, "ListIntents", func() { out = nil }, func() error {
		return s.scanAt(ctx, from, clientv3.GetPrefixRangeEnd(from), constPage(scanPage), func(kv *mvccpb.KeyValue) (bool, error) {
			in, err := decodeIntent(string(kv.Key[len(from):]), kv.Value)
			out = append(out, in)
			return true, err
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// ListLeases scans the lease keys after f.After at one revision, filtering
// as it goes (there is no index by role, client or state), until it has
// one match beyond the page.
func (s *Store) ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error) {
	if f.Limit < 0 {
		return nil, "", fmt.Errorf("%w: negative limit %d", broker.ErrInvalidArgument, f.Limit)
	}
	release, err := s.enter(ctx)
	if err != nil {
		return nil, "", err
	}
	defer release()
	section := s.keys.section(sectionLease)
	from := section
	if f.After != "" {
		from = s.keys.lease(f.After) + "\x00"
	}
	filtered := f.Role != "" || f.Client != "" || f.State != broker.StateUnspecified
	var out []broker.Lease
	page := func() int64 {
		if f.Limit == 0 || filtered {
			return scanPage
		}
		return min(int64(f.Limit+1-len(out)), scanPage)
	}
	err = s.consistent(ctx, "ListLeases", func() { out = nil }, func() error {
		return s.scanAt(ctx, from, clientv3.GetPrefixRangeEnd(section), page, func(kv *mvccpb.KeyValue) (bool, error) {
			l, err := decodeLease(s.keys.leaseID(kv.Key), kv.Value, kv.ModRevision)
			if err != nil {
				return false, err
			}
			if f.Match(&l) {
				out = append(out, l)
			}
			return f.Limit == 0 || len(out) <= f.Limit, nil
		})
	})
	if err != nil {
		return nil, "", err
	}
	if f.Limit > 0 && len(out) > f.Limit {
		out = out[:f.Limit]
		return out, out[len(out)-1].ID, nil
	}
	return out, "", nil
}

// ScanExpiry reads the expiry section at one revision, without the lease
// records. The entries are gathered before fn sees any, so a scan whose
// revision is compacted can start again without fn seeing an entry twice;
// the section holds live leases only, which bounds the memory.
func (s *Store) ScanExpiry(ctx context.Context, fn func(broker.ExpiryEntry) bool) error {
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	from := s.keys.section(sectionExpiry)
	var entries []broker.ExpiryEntry
	err = s.consistent(ctx, "ScanExpiry", func() { entries = nil }, func() error {
		return s.scanAt(ctx, from, clientv3.GetPrefixRangeEnd(from), constPage(scanPage), func(kv *mvccpb.KeyValue) (bool, error) {
			due, id, err := s.keys.parseTimeKey(sectionExpiry, kv.Key)
			if err != nil {
				return false, err
			}
			e, err := decodeExpiry(id, due, kv.Value)
			entries = append(entries, e)
			return true, err
		})
	})
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !fn(e) {
			break
		}
	}
	return nil
}

// PurgeTombstones reads the tombstone section up to endedBefore in batches
// of at most maxTxnOps/2 leases, reads their records, and deletes each
// batch's records and tombstone keys in one Txn guarded by every record's
// mod revision; a lease rewritten meanwhile is left out and the rest
// retried. Batches are separate Txns: a purge that fails midway has
// deleted whole batches only.
func (s *Store) PurgeTombstones(ctx context.Context, endedBefore time.Time, limit int) (int, error) {
	if limit < 1 {
		return 0, fmt.Errorf("%w: purge limit %d", broker.ErrInvalidArgument, limit)
	}
	release, err := s.enter(ctx)
	if err != nil {
		return 0, err
	}
	defer release()
	from := s.keys.section(sectionTombstone)
	end := s.keys.timeBound(sectionTombstone, broker.PurgeCutoff(endedBefore))
	deleted := 0
	for deleted < limit {
		if err := ctx.Err(); err != nil {
			return deleted, err
		}
		resp, err := s.get(ctx, from, clientv3.WithRange(end), clientv3.WithLimit(int64(min(limit-deleted, maxTxnOps/2))), clientv3.WithKeysOnly())
		if err != nil {
			return deleted, errRead("PurgeTombstones", err)
		}
		if len(resp.Kvs) == 0 {
			break
		}
		n, err := s.purgeBatch(ctx, resp.Kvs)
		deleted += n
		if err != nil {
			return deleted, err
		}
		if !resp.More {
			break
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	return deleted, nil
}

// purge is one tombstone on its way to deletion.
type purge struct {
	key, tombstone string
	rev            int64
}

func (s *Store) purgeBatch(ctx context.Context, tombstones []*mvccpb.KeyValue) (int, error) {
	reads := make([]clientv3.Op, 0, len(tombstones))
	ids := make([]string, 0, len(tombstones))
	for _, kv := range tombstones {
		_, id, err := s.keys.parseTimeKey(sectionTombstone, kv.Key)
		if err != nil {
			return 0, err
		}
		ids = append(ids, id)
		reads = append(reads, clientv3.OpGet(s.keys.lease(id)))
	}
	resp, err := s.readTxn(ctx, reads)
	if err != nil {
		return 0, errRead("PurgeTombstones", err)
	}
	var batch []purge
	for j, id := range ids {
		kvs := resp.Responses[j].GetResponseRange().Kvs
		if len(kvs) == 0 {
			continue // deleted meanwhile
		}
		rec, err := decodeRecord(id, kvs[0].Value)
		if err != nil {
			return 0, err
		}
		// Still the terminal lease the tombstone key was read for: not
		// rewritten (live again, or another end time) since.
		idx, ok := s.keys.indexOf(id, rec)
		if !ok || !broker.LeaseState(rec.State).Terminal() || idx.key != string(tombstones[j].Key) {
			continue
		}
		batch = append(batch, purge{key: s.keys.lease(id), tombstone: idx.key, rev: kvs[0].ModRevision})
	}
	for len(batch) > 0 {
		var cmps []clientv3.Cmp
		var then, els []clientv3.Op
		for _, p := range batch {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(p.key), "=", p.rev))
			then = append(then, clientv3.OpDelete(p.key), clientv3.OpDelete(p.tombstone))
			els = append(els, clientv3.OpGet(p.key, clientv3.WithKeysOnly()))
		}
		txn, err := s.commit(ctx, "PurgeTombstones", cmps, then, els)
		if err != nil {
			return 0, err
		}
		if txn.Succeeded {
			return len(batch), nil
		}
		kept := batch[:0]
		for j, p := range batch {
			if kvs := txn.Responses[j].GetResponseRange().Kvs; len(kvs) == 1 && kvs[0].ModRevision == p.rev {
				kept = append(kept, p)
			}
		}
		if len(kept) == len(batch) { // cannot happen: some compare failed
			return 0, fmt.Errorf("etcd PurgeTombstones: %w", broker.ErrConflict)
		}
		batch = kept
	}
	return 0, nil
}

// LastIssued reads the lastissued section in one range read.
func (s *Store) LastIssued(ctx context.Context) (map[string]time.Time, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	from := s.keys.section(sectionLastIssued)
	resp, err := s.get(ctx, from, clientv3.WithPrefix())
	if err != nil {
		return nil, errRead("LastIssued", err)
	}
	out := make(map[string]time.Time, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		n, err := parseHex16(string(kv.Value))
		if err != nil {
			return nil, fmt.Errorf("etcd LastIssued: role %q: %w", kv.Key[len(from):], err)
		}
		out[string(kv.Key[len(from):])] = nanosTime(n)
	}
	return out, nil
}
