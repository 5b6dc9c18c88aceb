package server

import (
	"context"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// activeLeases counts the active leases of each role and of each identity,
// so that a quota check costs a map lookup rather than a scan of the store.
//
// The counts are read from the store once, on first use, and kept up to
// date from the broker's lifecycle events (broker.WatchLifecycle): an issue
// adds a lease, any revocation, expiry or failed revocation removes it.
// Events are keyed by lease id, so an event seen twice (a revocation that
// fails and is retried) or for a lease never counted changes nothing.
//
// A lease whose revocation has begun but not finished (REVOKING) is still
// counted until the broker reports the outcome; that errs on the side of
// refusing an issue for the few milliseconds a revocation takes.
//
// In a group of brokers sharing one store, the events include the other
// instances' issues and ends (AuditEvent.Remote, from the store's change
// feed), so every instance counts the group's leases. They may come late
// and may repeat this instance's own events, so a lease that ended is
// remembered for endedMemory, and a late report of its issue does not
// count it again. What the group can exceed a quota by: an instance
// counts another's issue once the feed brings it (milliseconds), so
// issues admitted on different instances within that delay can together
// pass the quota, by at most one lease per instance and per issue in
// flight on it.
type activeLeases struct {
	b *broker.Broker

	mu    sync.Mutex
	state loadState
	// leases maps each counted lease id to its role and owner.
	leases   map[string]leaseKey
	byRole   map[string]int
	byClient map[string]int
	// endedWhileLoading holds leases that ended during the first scan,
	// which may have read them as active.
	endedWhileLoading map[string]struct{}
	// ended remembers leases that ended, and when, so that a late report
	// of their issue is ignored; pruned after endedMemory.
	ended      map[string]time.Time
	endedPrune time.Time
}

// endedMemory is how long an ended lease is remembered: far longer than
// the store's change feed takes to report a lease's issue.
const endedMemory = 10 * time.Minute

type leaseKey struct{ role, client string }

type loadState int

const (
	notLoaded loadState = iota // events are ignored: the scan will see their effect
	loading                    // events are recorded beside the scan
	loaded                     // events update the counts
)

func newActiveLeases(b *broker.Broker) *activeLeases {
	a := &activeLeases{b: b}
	a.reset()
	// Watched for the life of the broker: a server is built once per broker.
	b.WatchLifecycle(a.observe)
	return a
}

func (a *activeLeases) reset() {
	a.leases = make(map[string]leaseKey)
	a.byRole = make(map[string]int)
	a.byClient = make(map[string]int)
	a.endedWhileLoading = nil
	a.ended = make(map[string]time.Time)
}

// observe applies one lifecycle event. It runs in the broker's call that
// committed the event, so it only touches maps.
func (a *activeLeases) observe(ev broker.AuditEvent) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.state == notLoaded || ev.LeaseID == "" {
		return
	}
	switch ev.Action {
	case broker.AuditIssue:
		if _, ended := a.ended[ev.LeaseID]; !ended {
			a.add(ev.LeaseID, leaseKey{ev.Role, ev.Client})
		}
	case broker.AuditRevoke, broker.AuditExpire, broker.AuditRevokeFailed:
		a.remove(ev.LeaseID)
		a.rememberEnded(ev.LeaseID)
		if a.state == loading {
			a.endedWhileLoading[ev.LeaseID] = struct{}{}
		}
	}
}

// rememberEnded records that a lease ended, and forgets those that ended
// more than endedMemory ago (at most once a minute, so the cost is spread).
func (a *activeLeases) rememberEnded(id string) {
	now := time.Now()
	a.ended[id] = now
	if now.Sub(a.endedPrune) < time.Minute {
		return
	}
	a.endedPrune = now
	for k, t := range a.ended {
		if now.Sub(t) > endedMemory {
			delete(a.ended, k)
		}
	}
}

func (a *activeLeases) add(id string, k leaseKey) {
	if _, ok := a.leases[id]; ok {
		return
	}
	a.leases[id] = k
	a.byRole[k.role]++
	a.byClient[k.client]++
}

func (a *activeLeases) remove(id string) {
	k, ok := a.leases[id]
	if !ok {
		return
	}
	delete(a.leases, id)
	if a.byRole[k.role]--; a.byRole[k.role] <= 0 {
		delete(a.byRole, k.role)
	}
	if a.byClient[k.client]--; a.byClient[k.client] <= 0 {
		delete(a.byClient, k.client)
	}
}

// counts returns the active leases of role and of identity, reading the
// store first if this is the first call. Callers serialise calls (the
// quota keeper's checkMu), so only one first scan runs.
func (a *activeLeases) counts(ctx context.Context, role, identity string) (roleN, idN int, err error) {
	a.mu.Lock()
	state := a.state
	a.mu.Unlock()
	if state != loaded {
		if err := a.load(ctx); err != nil {
			return 0, 0, err
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.byRole[role], a.byClient[identity], nil
}

// load counts the active leases in the store, once. Events that arrive
// during the scan are applied as they come; a lease that ended during the
// scan is not counted even if the scan read it as active.
func (a *activeLeases) load(ctx context.Context) error {
	a.mu.Lock()
	a.state = loading
	a.endedWhileLoading = make(map[string]struct{})
	a.mu.Unlock()

	var found []broker.Lease
	f := broker.LeaseFilter{State: broker.StateActive, Limit: 1000}
	for {
		page, next, err := a.b.ListLeases(ctx, f)
		if err != nil {
			a.mu.Lock()
			a.state = notLoaded
			a.reset()
			a.mu.Unlock()
			return err
		}
		for i := range page {
			// Keep only what the counts need, not the whole lease.
			found = append(found, broker.Lease{ID: page[i].ID, Role: page[i].Role, Client: page[i].Client})
		}
		if next == "" {
			break
		}
		f.After = next
	}

	a.mu.Lock()
	defer a.mu.Unlock()
	for _, l := range found {
		if _, ended := a.endedWhileLoading[l.ID]; !ended {
			a.add(l.ID, leaseKey{l.Role, l.Client})
		}
	}
	a.endedWhileLoading = nil
	a.state = loaded
	return nil
}
