package etcd

import (
	"context"
	"sync"
	"sync/atomic"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
)

// Group commit of the issue path's writes. Every issue writes an intent
// (PutIntent) and then its lease (CreateLease); at 16 concurrent issues
// that is hundreds of Txns a second, each a request through raft that the
// three members handle one by one. So concurrent PutIntents and
// CreateLeases that are not fenced go through one committer: a write that
// finds none in flight is sent at once, alone (a lone issue waits for
// nobody); those that arrive while it is in flight are merged into the
// next Txn, whose compare is every entry's compare and whose operations
// are every entry's operations. etcd's Txn is all or nothing, so when any
// compare fails (a lease id that exists: rare), or etcd refuses the merged
// request, nothing was written, and every entry is committed again alone,
// exactly as without grouping. A merged Txn that times out is an unknown
// outcome for each of its entries, as a lone one is.
//
// A merged Txn holds at most maxTxnOps operations and maxTxnBytes, never
// two entries that touch one key (etcd refuses a Txn that puts a key
// twice; the later entry waits for the next Txn), and moves each role's
// last issue time once, to the latest of its entries'.

// groupWrite is one write waiting for the committer.
type groupWrite struct {
	ctx  context.Context
	op   string
	cmps []clientv3.Cmp
	then []clientv3.Op
	keys []string // the keys then puts or deletes
	size int      // bytes of keys and values
	// role and issue (hex16) move the role's last issue time; "" when not.
	role, issue string
	done        chan groupResult // buffered: the caller may have gone
}

type groupResult struct {
	resp  *clientv3.TxnResponse // a write sent alone: its own response
	rev   int64                 // the merged Txn's revision, when it succeeded
	alone bool                  // commit alone (the merged Txn did not apply)
	err   error
}

type groupCommitter struct {
	mu      sync.Mutex
	pending []*groupWrite
	running bool
}

// lastIssuedOp moves the role's last issue time forward to issue in a
// nested Txn that compares the stored value (fixed-width hex, so byte
// order is time order): no read first and no retry.
func (s *Store) lastIssuedOp(role, issue string) clientv3.Op {
	act := s.keys.lastIssued(role)
	put := clientv3.OpPut(act, issue)
	return clientv3.OpTxn(
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(act), "=", 0)},
		[]clientv3.Op{put},
		// A value compare fails on a missing key, hence two levels.
		[]clientv3.Op{clientv3.OpTxn(
			[]clientv3.Cmp{clientv3.Compare(clientv3.Value(act), "<", issue)},
			[]clientv3.Op{put}, nil)},
	)
}

// commitAlone is w's own Txn.
func (s *Store) commitAlone(ctx context.Context, w *groupWrite) (*clientv3.TxnResponse, error) {
	then := w.then
	if w.role != "" {
		then = append(then[:len(then):len(then)], s.lastIssuedOp(w.role, w.issue))
	}
	return s.commit(ctx, w.op, w.cmps, then, nil)
}

// commitGrouped commits w, merged with concurrent writes when there are
// any. It returns what commitAlone would: a response whose Succeeded is
// whether w's compares held, and whose Header.Revision is the revision
// the write was committed at.
func (s *Store) commitGrouped(ctx context.Context, w *groupWrite) (*clientv3.TxnResponse, error) {
	if _, fenced := broker.FenceFrom(ctx); fenced {
		return s.commitAlone(ctx, w)
	}
	w.ctx = ctx
	w.done = make(chan groupResult, 1)
	g := &s.group
	g.mu.Lock()
	g.pending = append(g.pending, w)
	if !g.running {
		g.running = true
		go s.runGroup()
	}
	g.mu.Unlock()
	select {
	case r := <-w.done:
		switch {
		case r.err != nil:
			return nil, r.err
		case r.resp != nil:
			return r.resp, nil
		case r.alone:
			return s.commitAlone(ctx, w)
		}
		return &clientv3.TxnResponse{Header: &etcdserverpb.ResponseHeader{Revision: r.rev}, Succeeded: true}, nil
	case <-ctx.Done():
		// It may be in a Txn in flight, or be sent later.
		return nil, errWrite(w.op, ctx.Err())
	}
}

// runGroup commits pending writes until none is left.
func (s *Store) runGroup() {
	g := &s.group
	for {
		g.mu.Lock()
		batch, rest := takeGroup(g.pending)
		g.pending = rest
		if len(batch) == 0 {
			g.running = false
			g.mu.Unlock()
			return
		}
		g.mu.Unlock()
		s.commitBatch(batch)
	}
}

// takeGroup picks, in arrival order, the pending writes that fit one Txn
// together; the rest stay pending. A write whose caller has gone is
// answered and dropped: it was never sent.
func takeGroup(pending []*groupWrite) (batch, rest []*groupWrite) {
	touched := map[string]bool{}
	roles := map[string]bool{}
	ops, size := 0, 0
	for _, w := range pending {
		if err := w.ctx.Err(); err != nil {
			w.done <- groupResult{err: err}
			continue
		}
		n := len(w.then)
		if w.role != "" && !roles[w.role] {
			n++
		}
		clash := false
		for _, k := range w.keys {
			clash = clash || touched[k]
		}
		if len(batch) > 0 && (clash || ops+n > maxTxnOps || size+w.size > maxTxnBytes) {
			rest = append(rest, w)
			continue
		}
		for _, k := range w.keys {
			touched[k] = true
		}
		if w.role != "" {
			roles[w.role] = true
		}
		ops, size = ops+n, size+w.size
		batch = append(batch, w)
	}
	return batch, rest
}

// testHookGroupCommit, when set (by tests), runs before each Txn of the
// committer.
var testHookGroupCommit atomic.Pointer[func()]

// commitBatch sends batch as one Txn and answers each write.
func (s *Store) commitBatch(batch []*groupWrite) {
	if h := testHookGroupCommit.Load(); h != nil {
		(*h)()
	}
	if len(batch) == 1 {
		w := batch[0]
		resp, err := s.commitAlone(w.ctx, w)
		w.done <- groupResult{resp: resp, err: err}
		return
	}
	var cmps []clientv3.Cmp
	var then []clientv3.Op
	latest := map[string]string{}
	var roles []string
	for _, w := range batch {
		cmps = append(cmps, w.cmps...)
		then = append(then, w.then...)
		if w.role == "" {
			continue
		}
		if old, ok := latest[w.role]; !ok {
			roles = append(roles, w.role)
			latest[w.role] = w.issue
		} else if w.issue > old {
			latest[w.role] = w.issue
		}
	}
	for _, r := range roles {
		then = append(then, s.lastIssuedOp(r, latest[r]))
	}
	// The Txn serves many callers, so it runs on a context of its own.
	ctx := context.Background()
	resp, err := s.commit(ctx, "group commit", cmps, then, nil)
	for _, w := range batch {
		switch {
		case err != nil && refused(err):
			// Not applied: each alone, which finds whose it was.
			w.done <- groupResult{alone: true}
		case err != nil:
			w.done <- groupResult{err: err}
		case !resp.Succeeded:
			w.done <- groupResult{alone: true}
		default:
			w.done <- groupResult{rev: resp.Header.Revision}
		}
	}
}
