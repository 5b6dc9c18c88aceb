package broker

import "sync"

// keyedMutex serializes work on one lease (renew against revoke, two
// revokes) without serializing unrelated leases.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*refMutex
}

type refMutex struct {
	sync.Mutex
	refs int
}

func (k *keyedMutex) Lock(key string) func() {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = make(map[string]*refMutex)
	}
	m, ok := k.locks[key]
	if !ok {
		m = &refMutex{}
		k.locks[key] = m
	}
	m.refs++
	k.mu.Unlock()
	m.Lock()
	return k.unlocker(key, m)
}

// unlocker returns the function that releases m, held for key, and forgets
// key once nobody holds or awaits it.
func (k *keyedMutex) unlocker(key string, m *refMutex) func() {
	return func() {
		m.Unlock()
		k.mu.Lock()
		m.refs--
		if m.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}

// tryLock is Lock without waiting: ok is false when the key is held or
// awaited by someone else.
func (k *keyedMutex) tryLock(key string) (unlock func(), ok bool) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = make(map[string]*refMutex)
	}
	if _, busy := k.locks[key]; busy {
		k.mu.Unlock()
		return nil, false
	}
	m := &refMutex{refs: 1}
	m.Lock()
	k.locks[key] = m
	k.mu.Unlock()
	return k.unlocker(key, m), true
}
