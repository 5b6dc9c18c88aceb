package etcd

import (
	"sync"

	"github.com/credbroker/credbroker/broker"
)

// The index cache. Updating a lease may move its index key or rewrite its
// value, decided against the old key and value (placeIndex), which are
// derived from the stored record; UpdateLeases used to read every
// record back before its Txn for that alone, one more request through raft
// per batch. But a key's mod revision names one version of it for good
// (revisions are cluster-wide and never reused), so the index key derived
// from the record at mod revision r is the old index key of every update
// guarded by Compare(ModRevision(key), "=", r): when that compare holds,
// the record is still the one the key was derived from; when it fails, the
// Txn changes nothing. So the store remembers, per lease, the index key of
// the last version it read or wrote, and an update whose revision matches
// needs no read. The change feed (feed.go) fills it with what the other
// instances write, for as long as the broker follows it. A miss (a
// version the store has not seen yet, or an evicted entry) reads as
// before.
//
// The one case this would get wrong is a cluster whose revisions go back
// (etcd restored from a snapshot under running brokers): etcd's own
// documentation requires restarting clients then, since watches and
// revision compares of every client break the same way.
//
// The cache keeps the lease of that version too, for LeaseHint: a hint
// may be stale by contract (broker.LeaseHinter), and this one is at worst
// the last version this store saw.

// indexCacheMax bounds the cache; past it, an insert evicts arbitrary
// entries (a miss costs only the read the cache saves).
const indexCacheMax = 1 << 15

type cachedIndex struct {
	rev    int64
	idx    indexKey
	hasIdx bool
	lease  broker.Lease
}

type indexCache struct {
	mu sync.Mutex
	m  map[string]cachedIndex
}

// put records that the lease id at mod revision rev is l and has index
// key idx (hasIdx false: none). An older revision never replaces a newer
// one. l becomes the cache's: the caller must not change it.
func (c *indexCache) put(id string, rev int64, idx indexKey, hasIdx bool, l broker.Lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[string]cachedIndex)
	}
	if old, ok := c.m[id]; ok && old.rev > rev {
		return
	}
	if len(c.m) >= indexCacheMax {
		n := 0
		for k := range c.m {
			delete(c.m, k)
			if n++; n >= indexCacheMax/4 {
				break
			}
		}
	}
	c.m[id] = cachedIndex{rev: rev, idx: idx, hasIdx: hasIdx, lease: l}
}

// get returns the index key of the lease id at mod revision rev, if known.
func (c *indexCache) get(id string, rev int64) (indexKey, bool, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[id]
	if !ok || e.rev != rev {
		return indexKey{}, false, false
	}
	return e.idx, e.hasIdx, true
}

// hint returns the last version of the lease the cache knows.
func (c *indexCache) hint(id string) (broker.Lease, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[id]
	if !ok {
		return broker.Lease{}, false
	}
	return e.lease.Clone(), true
}

func (c *indexCache) drop(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, id)
}
