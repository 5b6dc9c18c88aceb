package etcd

import (
	"context"
	"encoding/json"
	"fmt"
	"math"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
)

// CreateLease is one Txn: if the lease key was never created (create
// revision 0), put the record and its index key, delete the intent, and
// move the role's last issue time forward (lastIssuedOp: no read first
// and no retry). Concurrent creates share a Txn (groupcommit.go).
func (s *Store) CreateLease(ctx context.Context, l *broker.Lease) error {
	if l == nil {
		return fmt.Errorf("%w: nil lease", broker.ErrInvalidArgument)
	}
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	rec, val, err := encodeLease(l)
	if err != nil {
		return err
	}
	idx, ok := s.keys.indexOf(l.ID, rec)
	if !ok { // CheckStorable accepted the state: unreachable
		return fmt.Errorf("%w: lease %q has no index key", broker.ErrInvalidArgument, l.ID)
	}
	key, intent := s.keys.lease(l.ID), s.keys.intent(l.ID)
	w := &groupWrite{
		op:   "CreateLease",
		cmps: []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
		then: []clientv3.Op{
			clientv3.OpPut(key, string(val)),
			clientv3.OpPut(idx.key, idx.val),
			clientv3.OpDelete(intent),
		},
		keys: []string{key, idx.key, intent},
		size: len(key) + len(val) + len(idx.key) + len(idx.val) + len(intent),
	}
	if l.Role != "" && rec.Issue != 0 {
		w.role, w.issue = l.Role, hex16(rec.Issue)
	}
	resp, err := s.commitGrouped(ctx, w)
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("lease %q: %w", l.ID, broker.ErrExists)
	}
	l.Revision = uint64(resp.Header.Revision)
	s.indexes.put(l.ID, resp.Header.Revision, idx, true, l.Clone())
	return nil
}

// GetLease reads the lease key; its mod revision is the lease's revision.
func (s *Store) GetLease(ctx context.Context, id string) (broker.Lease, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return broker.Lease{}, err
	}
	defer release()
	resp, err := s.get(ctx, s.keys.lease(id))
	if err != nil {
		return broker.Lease{}, errRead("GetLease", err)
	}
	if len(resp.Kvs) == 0 {
		return broker.Lease{}, fmt.Errorf("lease %q: %w", id, broker.ErrLeaseNotFound)
	}
	kv := resp.Kvs[0]
	return s.decodeRead(id, kv.Value, kv.ModRevision)
}

// decodeRead decodes a lease record read at mod revision rev and
// remembers its index key for the next update (indexcache.go).
func (s *Store) decodeRead(id string, v []byte, rev int64) (broker.Lease, error) {
	r, err := decodeRecord(id, v)
	if err != nil {
		return broker.Lease{}, err
	}
	idx, ok := s.keys.indexOf(id, r)
	l := r.lease(id, rev)
	s.indexes.put(id, rev, idx, ok, l.Clone())
	return l, nil
}

var (
	_ broker.LeasesReader = (*Store)(nil)
	_ broker.LeaseHinter  = (*Store)(nil)
)

// GetLeases implements broker.LeasesReader: one linearizable read Txn of
// at most maxTxnOps keys, all at one revision, where GetLease per lease
// costs one read through raft each.
func (s *Store) GetLeases(ctx context.Context, ids []string) ([]broker.Lease, []error) {
	out := make([]broker.Lease, len(ids))
	errs := make([]error, len(ids))
	release, err := s.enter(ctx)
	if err != nil {
		return out, fill(errs, err)
	}
	defer release()
	s.getLeases(ctx, ids, out, errs)
	return out, errs
}

func (s *Store) getLeases(ctx context.Context, ids []string, out []broker.Lease, errs []error) {
	for start := 0; start < len(ids); start += maxTxnOps {
		chunk := ids[start:min(start+maxTxnOps, len(ids))]
		ops := make([]clientv3.Op, len(chunk))
		for j, id := range chunk {
			ops[j] = clientv3.OpGet(s.keys.lease(id))
		}
		resp, err := s.readTxn(ctx, ops)
		if err != nil {
			fill(errs[start:start+len(chunk)], errRead("GetLeases", err))
			continue
		}
		for j, id := range chunk {
			kvs := resp.Responses[j].GetResponseRange().Kvs
			if len(kvs) == 0 {
				errs[start+j] = fmt.Errorf("lease %q: %w", id, broker.ErrLeaseNotFound)
				continue
			}
			out[start+j], errs[start+j] = s.decodeRead(id, kvs[0].Value, kvs[0].ModRevision)
		}
	}
}

// LeaseHints implements broker.LeaseHinter: what LeaseHint returns from
// the cache, and for the leases the cache does not know, GetLeases.
func (s *Store) LeaseHints(ctx context.Context, ids []string) ([]broker.Lease, []error) {
	out := make([]broker.Lease, len(ids))
	errs := make([]error, len(ids))
	release, err := s.enter(ctx)
	if err != nil {
		return out, fill(errs, err)
	}
	defer release()
	var miss []int
	var missIDs []string
	for i, id := range ids {
		if l, ok := s.indexes.hint(id); ok {
			out[i] = l
			continue
		}
		miss = append(miss, i)
		missIDs = append(missIDs, id)
	}
	if len(miss) == 0 {
		return out, errs
	}
	mo, me := make([]broker.Lease, len(miss)), make([]error, len(miss))
	s.getLeases(ctx, missIDs, mo, me)
	for j, i := range miss {
		out[i], errs[i] = mo[j], me[j]
	}
	return out, errs
}

// LeaseHint implements broker.LeaseHinter: the last version this store
// read or wrote (indexcache.go), else a serializable read, answered by
// the member the client talks to from its own state, without the round
// of heartbeats a linearizable read waits for. It may be stale.
func (s *Store) LeaseHint(ctx context.Context, id string) (broker.Lease, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return broker.Lease{}, err
	}
	defer release()
	if l, ok := s.indexes.hint(id); ok {
		return l, nil
	}
	resp, err := s.get(ctx, s.keys.lease(id), clientv3.WithSerializable())
	if err != nil {
		return broker.Lease{}, errRead("LeaseHint", err)
	}
	if len(resp.Kvs) == 0 {
		return broker.Lease{}, fmt.Errorf("lease %q: %w", id, broker.ErrLeaseNotFound)
	}
	kv := resp.Kvs[0]
	return s.decodeRead(id, kv.Value, kv.ModRevision)
}

// DeleteLease reads the record (for its index key), then deletes the
// record and the index key in one Txn guarded by the record's mod
// revision, reading again if the lease changed meanwhile.
func (s *Store) DeleteLease(ctx context.Context, id string) error {
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	key := s.keys.lease(id)
	for {
		resp, err := s.get(ctx, key)
		if err != nil {
			return errRead("DeleteLease", err)
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
		kv := resp.Kvs[0]
		rec, err := decodeRecord(id, kv.Value)
		if err != nil {
			return err
		}
		then := []clientv3.Op{clientv3.OpDelete(key)}
		if idx, ok := s.keys.indexOf(id, rec); ok {
			then = append(then, clientv3.OpDelete(idx.key))
		}
		txn, err := s.commit(ctx, "DeleteLease",
			[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)}, then, nil)
		if err == nil && txn.Succeeded {
			s.indexes.drop(id)
		}
		if err != nil || txn.Succeeded {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// UpdateLease is UpdateLeases of one lease.
func (s *Store) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return broker.Lease{}, err
	}
	defer release()
	out, errs := s.updateLeases(ctx, []broker.Lease{l})
	return out[0], errs[0]
}

// UpdateLeases reads the stored records (for their revisions and old
// index keys), then commits the entries whose revision matches in Txns of
// at most maxTxnOps operations and maxTxnBytes, each guarded by every
// entry's mod revision. etcd's Txn is all or nothing: when a group's
// compare fails, its Else branch reads the group's keys, the entries
// that lost are failed and the rest retried. A lease named more than once
// is updated in rounds, its n-th entry in round n (a Txn may not put one
// key twice), so a later entry sees the revision the earlier one wrote.
func (s *Store) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	release, err := s.enter(ctx)
	if err != nil {
		return make([]broker.Lease, len(ls)), fill(make([]error, len(ls)), err)
	}
	defer release()
	return s.updateLeases(ctx, ls)
}

func fill(errs []error, err error) []error {
	for i := range errs {
		errs[i] = err
	}
	return errs
}

// update is one entry of UpdateLeases on its way to a Txn.
type update struct {
	i      int // index in the caller's slice
	key    string
	rev    int64
	val    []byte
	newIdx indexKey
	oldIdx indexKey
	hasOld bool
}

// newUpdate places rec's index key given the stored version's (placeIndex)
// and encodes the record that names it.
func (s *Store) newUpdate(i int, id string, rev int64, rec *leaseRecord, oldIdx indexKey, hasOld bool) (*update, error) {
	newIdx, _ := s.keys.placeIndex(id, rec, oldIdx, hasOld)
	val, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	return &update{i: i, key: s.keys.lease(id), rev: rev, val: val, newIdx: newIdx, oldIdx: oldIdx, hasOld: hasOld}, nil
}

// ops writes the record, and the index key when it moved or its value
// changed: a renewal is the record's put alone (indexKey).
func (u *update) ops() []clientv3.Op {
	ops := []clientv3.Op{clientv3.OpPut(u.key, string(u.val))}
	if u.hasOld && u.oldIdx.key == u.newIdx.key {
		if u.oldIdx.val != u.newIdx.val {
			ops = append(ops, clientv3.OpPut(u.newIdx.key, u.newIdx.val))
		}
		return ops
	}
	if u.hasOld {
		ops = append(ops, clientv3.OpDelete(u.oldIdx.key))
	}
	return append(ops, clientv3.OpPut(u.newIdx.key, u.newIdx.val))
}

func (u *update) size() int {
	return len(u.key) + len(u.val) + len(u.newIdx.key) + len(u.newIdx.val) + len(u.oldIdx.key)
}

func (s *Store) updateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	out := make([]broker.Lease, len(ls))
	errs := make([]error, len(ls))
	recs := make([]*leaseRecord, len(ls))
	var rounds [][]int
	seen := map[string]int{}
	for i := range ls {
		rec, err := recordOf(&ls[i]) // encoded once its index key is placed
		if err != nil {
			errs[i] = err
			continue
		}
		recs[i] = rec
		n := seen[ls[i].ID]
		seen[ls[i].ID] = n + 1
		if n == len(rounds) {
			rounds = append(rounds, nil)
		}
		rounds[n] = append(rounds[n], i)
	}
	for _, round := range rounds {
		// The old index keys: from the cache where it knows the
		// revision the caller passed (the commit's compare then proves
		// the record unchanged), else from a read of the stored records,
		// maxTxnOps keys per read.
		var pending []*update
		var toRead []int
		for _, i := range round {
			l := &ls[i]
			if l.Revision > math.MaxInt64 {
				errs[i] = fmt.Errorf("lease %q at revision %d: %w", l.ID, l.Revision, broker.ErrConflict)
				continue
			}
			oldIdx, hasOld, ok := s.indexes.get(l.ID, int64(l.Revision))
			if !ok {
				toRead = append(toRead, i)
				continue
			}
			u, err := s.newUpdate(i, l.ID, int64(l.Revision), recs[i], oldIdx, hasOld)
			if err != nil {
				errs[i] = err
				continue
			}
			pending = append(pending, u)
		}
		for start := 0; start < len(toRead); start += maxTxnOps {
			chunk := toRead[start:min(start+maxTxnOps, len(toRead))]
			ops := make([]clientv3.Op, len(chunk))
			for j, i := range chunk {
				ops[j] = clientv3.OpGet(s.keys.lease(ls[i].ID))
			}
			resp, err := s.readTxn(ctx, ops)
			if err != nil {
				for _, i := range chunk {
					errs[i] = errRead("UpdateLeases", err)
				}
				continue
			}
			for j, i := range chunk {
				l := &ls[i]
				kvs := resp.Responses[j].GetResponseRange().Kvs
				if len(kvs) == 0 {
					errs[i] = fmt.Errorf("lease %q: %w", l.ID, broker.ErrLeaseNotFound)
					continue
				}
				if uint64(kvs[0].ModRevision) != l.Revision {
					errs[i] = fmt.Errorf("lease %q at revision %d, not %d: %w", l.ID, kvs[0].ModRevision, l.Revision, broker.ErrConflict)
					continue
				}
				old, err := decodeRecord(l.ID, kvs[0].Value)
				if err != nil {
					errs[i] = err
					continue
				}
				oldIdx, hasOld := s.keys.indexOf(l.ID, old)
				u, err := s.newUpdate(i, l.ID, kvs[0].ModRevision, recs[i], oldIdx, hasOld)
				if err != nil {
					errs[i] = err
					continue
				}
				pending = append(pending, u)
			}
		}
		if testHookUpdateRead != nil {
			testHookUpdateRead()
		}
		// Commit in groups that fit a Txn.
		for len(pending) > 0 {
			var group []*update
			ops, bytes := 0, 0
			for len(pending) > 0 {
				u := pending[0]
				n, b := len(u.ops()), u.size()
				if len(group) > 0 && (ops+n > maxTxnOps || bytes+b > maxTxnBytes) {
					break
				}
				group = append(group, u)
				ops, bytes = ops+n, bytes+b
				pending = pending[1:]
			}
			s.commitGroup(ctx, ls, group, out, errs)
		}
	}
	return out, errs
}

// commitGroup commits one group of updates, retrying without the entries
// whose compare failed until the rest commit or none is left.
func (s *Store) commitGroup(ctx context.Context, ls []broker.Lease, group []*update, out []broker.Lease, errs []error) {
	for len(group) > 0 {
		if err := ctx.Err(); err != nil {
			for _, u := range group {
				errs[u.i] = err // not sent: nothing changed
			}
			return
		}
		var cmps []clientv3.Cmp
		var then, els []clientv3.Op
		for _, u := range group {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(u.key), "=", u.rev))
			then = append(then, u.ops()...)
			els = append(els, clientv3.OpGet(u.key, clientv3.WithKeysOnly()))
		}
		resp, err := s.commit(ctx, "UpdateLeases", cmps, then, els)
		if err != nil {
			for _, u := range group {
				errs[u.i] = err
			}
			return
		}
		if resp.Succeeded {
			for _, u := range group {
				// Decoded from what was written: exactly what
				// GetLease returns now.
				l, err := decodeLease(ls[u.i].ID, u.val, resp.Header.Revision)
				out[u.i], errs[u.i] = l, err
				if err == nil {
					s.indexes.put(l.ID, resp.Header.Revision, u.newIdx, true, l.Clone())
				}
			}
			return
		}
		kept := group[:0]
		for j, u := range group {
			kvs := resp.Responses[j].GetResponseRange().Kvs
			switch {
			case len(kvs) == 0:
				errs[u.i] = fmt.Errorf("lease %q: %w", ls[u.i].ID, broker.ErrLeaseNotFound)
			case kvs[0].ModRevision != u.rev:
				errs[u.i] = fmt.Errorf("lease %q: %w", ls[u.i].ID, broker.ErrConflict)
			default:
				kept = append(kept, u)
			}
		}
		if len(kept) == len(group) { // cannot happen: some compare failed
			for _, u := range group {
				errs[u.i] = fmt.Errorf("lease %q: %w", ls[u.i].ID, broker.ErrConflict)
			}
			return
		}
		group = kept
	}
}
