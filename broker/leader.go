package broker

import "sync"

// leadership says whether this instance runs the group's background work:
// the expiry manager's revocations, reconciliation, tombstone purges and
// revocations on disconnect. Every instance serves every call and keeps
// its expiry queue and stream state current (from its own writes, and
// from the store's change feed for the others', follow.go), so the one
// that leads can start at once.
//
// A broker alone on its store leads from the start. A group's instances
// start as standbys (Config.Standby) and are switched by SetLeading; the
// election that decides it (etcd's, on a session with session_ttl) is not
// here.
type leadership struct {
	mu      sync.Mutex
	on      bool
	changed chan struct{} // closed and replaced at every change
}

func (l *leadership) init(on bool) {
	l.on = on
	l.changed = make(chan struct{})
}

// get returns whether this instance leads, and a channel closed at the
// next change.
func (l *leadership) get() (bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.on, l.changed
}

// SetLeading makes this instance run the group's background work (true)
// or stop starting it (false). Work already under way finishes; a lease
// revocation that a deposed leader begins meanwhile is settled by the
// store's compare-and-set and, once fenced, by the store's refusal.
func (b *Broker) SetLeading(on bool) {
	b.leadSwitch.mu.Lock()
	defer b.leadSwitch.mu.Unlock()
	if b.leadSwitch.on == on {
		return
	}
	b.leadSwitch.on = on
	close(b.leadSwitch.changed)
	b.leadSwitch.changed = make(chan struct{})
	if on {
		b.log.Info("leading: running the group's expiry, reconciliation and disconnect revocations", "instance", b.cfg.Instance)
	} else {
		b.log.Info("standing by: another instance runs the group's background work", "instance", b.cfg.Instance)
	}
}

// Leading reports whether this instance runs the group's background work.
func (b *Broker) Leading() bool {
	on, _ := b.leadSwitch.get()
	return on
}

// Instance is this broker's name in its group (Config.Instance).
func (b *Broker) Instance() string { return b.cfg.Instance }
