package etcd

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
)

// Writing another store's records as they are, for `brokerctl migrate`
// (store/migrate), which moves a bbolt file into an empty prefix. The
// broker never calls these.
//
// Every import is idempotent: a key is written only if it does not exist
// (create revision 0), and a key that exists already holding exactly the
// value the import would write counts as done. So a migration cut off at
// any point, a timeout included, is finished by running it again; a key
// holding anything else is an error naming it, and nothing of its batch is
// written. The records are JSON of Go structs (map keys sorted), so the
// same lease always encodes to the same bytes.

// importBatch bounds how many records one import Txn writes: a lease is a
// compare and two puts, and etcd allows 128 of each per Txn.
const importBatch = maxTxnOps / 2

// importItem is one record on its way in: its key and value, checked for
// equality when the key exists, and the other keys written with it.
type importItem struct {
	name  string // for errors: "lease <id>"
	key   string
	val   string
	extra []clientv3.Op
}

func (it *importItem) size() int {
	n := len(it.key) + len(it.val)
	for _, op := range it.extra {
		n += len(op.KeyBytes()) + len(op.ValueBytes())
	}
	return n
}

// ImportGroupID gives the prefix the group id id, the source store's, so
// that the marker roles it claimed stay this group's. A prefix that holds
// id already is left alone; one that holds another id is
// broker.ErrExists.
func (s *Store) ImportGroupID(ctx context.Context, id string) error {
	if id == "" {
		return fmt.Errorf("%w: empty group id", broker.ErrInvalidArgument)
	}
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	_, err = s.importItems(ctx, "ImportGroupID", []importItem{{name: "group id", key: s.keys.group(), val: id}})
	return err
}

// ImportIntents writes each intent unless its key holds that intent
// already. It returns how many it wrote.
func (s *Store) ImportIntents(ctx context.Context, ins []broker.Intent) (int, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return 0, err
	}
	defer release()
	items := make([]importItem, 0, len(ins))
	for i := range ins {
		v, err := encodeIntent(&ins[i])
		if err != nil {
			return 0, fmt.Errorf("intent %q: %w", ins[i].LeaseID, err)
		}
		items = append(items, importItem{name: "intent " + ins[i].LeaseID, key: s.keys.intent(ins[i].LeaseID), val: string(v)})
	}
	return s.importItems(ctx, "ImportIntents", items)
}

// ImportLeases writes leases as given, in any state, each with its index
// key (expiry for a live lease, tombstone for a terminal one), unless the
// lease key holds that record already. It returns how many it wrote. The
// role's last issue time is not moved (ImportLastIssued copies the
// source's, which remembers purged leases too). A lease the store will not
// hold is broker.ErrInvalidArgument, one stored with another record
// broker.ErrExists; the batch it is in is not written.
func (s *Store) ImportLeases(ctx context.Context, ls []broker.Lease) (int, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return 0, err
	}
	defer release()
	items := make([]importItem, 0, len(ls))
	for i := range ls {
		rec, val, err := encodeLease(&ls[i])
		if err != nil {
			return 0, fmt.Errorf("lease %q: %w", ls[i].ID, err)
		}
		idx, ok := s.keys.indexOf(ls[i].ID, rec)
		if !ok { // encodeLease checked the state: unreachable
			return 0, fmt.Errorf("%w: lease %q has no index key", broker.ErrInvalidArgument, ls[i].ID)
		}
		items = append(items, importItem{name: "lease " + ls[i].ID, key: s.keys.lease(ls[i].ID), val: string(val),
			extra: []clientv3.Op{clientv3.OpPut(idx.key, idx.val)}})
	}
	return s.importItems(ctx, "ImportLeases", items)
}

// ImportLastIssued moves each role's last issue time forward to the one
// given (never back), as CreateLease does.
func (s *Store) ImportLastIssued(ctx context.Context, last map[string]time.Time) error {
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	roles := make([]string, 0, len(last))
	for role := range last {
		roles = append(roles, role)
	}
	sort.Strings(roles)
	for _, role := range roles {
		t, err := broker.StorableTime(last[role])
		if err != nil {
			return fmt.Errorf("last issue of role %q: %w", role, err)
		}
		if role == "" || t.IsZero() {
			continue
		}
		act, issue := s.keys.lastIssued(role), hex16(t.UnixNano())
		put := clientv3.OpPut(act, issue)
		_, err = s.commit(ctx, "ImportLastIssued",
			[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(act), "=", 0)},
			[]clientv3.Op{put},
			[]clientv3.Op{clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.Value(act), "<", issue)},
				[]clientv3.Op{put}, nil)})
		if err != nil {
			return err
		}
	}
	return nil
}

// importItems writes items in Txns of at most importBatch items and
// maxTxnBytes, each item guarded by "its key does not exist". When a
// Txn's compare fails, its Else branch has read the items' keys: an item
// whose key holds its value is done, one whose key holds another value
// fails the import, and the rest are tried again.
func (s *Store) importItems(ctx context.Context, op string, items []importItem) (int, error) {
	written := 0
	for len(items) > 0 {
		n, bytes := 0, 0
		for n < len(items) && n < importBatch {
			b := items[n].size()
			if n > 0 && bytes+b > maxTxnBytes {
				break
			}
			bytes += b
			n++
		}
		w, err := s.importGroup(ctx, op, items[:n])
		written += w
		if err != nil {
			return written, err
		}
		items = items[n:]
	}
	return written, nil
}

func (s *Store) importGroup(ctx context.Context, op string, group []importItem) (int, error) {
	group = append([]importItem(nil), group...)
	for len(group) > 0 {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		var cmps []clientv3.Cmp
		var then, els []clientv3.Op
		for i := range group {
			it := &group[i]
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(it.key), "=", 0))
			then = append(then, clientv3.OpPut(it.key, it.val))
			then = append(then, it.extra...)
			els = append(els, clientv3.OpGet(it.key))
		}
		resp, err := s.commit(ctx, op, cmps, then, els)
		if err != nil {
			return 0, err
		}
		if resp.Succeeded {
			return len(group), nil
		}
		kept := group[:0]
		for j, it := range group {
			kvs := resp.Responses[j].GetResponseRange().Kvs
			switch {
			case len(kvs) == 0:
				kept = append(kept, it)
			case bytes.Equal(kvs[0].Value, []byte(it.val)):
				// Written by an earlier run: done.
			default:
				return 0, fmt.Errorf("etcd %s: %s: %w: the target holds a different record at %s", op, it.name, broker.ErrExists, it.key)
			}
		}
		if len(kept) == len(group) { // cannot happen: some compare failed
			return 0, fmt.Errorf("etcd %s: %w", op, broker.ErrConflict)
		}
		group = kept
	}
	return 0, nil
}

// KeyCounts is how many keys of each kind a prefix holds.
type KeyCounts struct {
	// Leases counts lease records; Expiry and Tombstones their index
	// keys (live and terminal leases).
	Leases, Expiry, Tombstones int64
	Intents                    int64
	// LastIssued counts roles with a last issue time.
	LastIssued int64
	// Group is 1 when the prefix has a group id (GroupID), else 0.
	Group int64
	// All counts every key under the prefix, those above, the group id
	// and any other (the leader election's) included.
	All int64
}

// CountKeys counts the keys of each kind under the prefix, at one
// revision. It reads no value: it is for checking a migration, and for
// telling an empty prefix from a used one.
func (s *Store) CountKeys(ctx context.Context) (KeyCounts, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return KeyCounts{}, err
	}
	defer release()
	sections := []string{sectionLease, sectionExpiry, sectionTombstone, sectionIntent, sectionLastIssued}
	ops := make([]clientv3.Op, 0, len(sections)+1)
	for _, sec := range sections {
		ops = append(ops, clientv3.OpGet(s.keys.section(sec), clientv3.WithPrefix(), clientv3.WithCountOnly()))
	}
	ops = append(ops,
		clientv3.OpGet(s.keys.group(), clientv3.WithCountOnly()),
		clientv3.OpGet(s.keys.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly()))
	resp, err := s.readTxn(ctx, ops)
	if err != nil {
		return KeyCounts{}, errRead("CountKeys", err)
	}
	n := func(i int) int64 { return resp.Responses[i].GetResponseRange().Count }
	return KeyCounts{Leases: n(0), Expiry: n(1), Tombstones: n(2), Intents: n(3), LastIssued: n(4), Group: n(5), All: n(6)}, nil
}

// Prefix returns the store's key prefix.
func (s *Store) Prefix() string { return s.keys.prefix }
