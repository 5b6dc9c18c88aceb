package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrNotLeader: this broker does not (or no longer) lead its group, so it
// may not do the group's background work. A store refuses a leader-only
// write whose fence no longer holds with it, and the broker checks for it
// before each DROP the reconciler would run.
var ErrNotLeader = errors.New("not the leader of the broker group")

// Leadership elects, among the brokers of one group (several brokerd
// sharing one store), the one that runs the group's background work:
// expiry, reconciliation, disconnect revocations and the tombstone purge.
// Any broker serves every call; only a leader does that work, and only
// during a Term. Config.Leadership nil means the broker is its group's
// only member (one bbolt file) and always leads.
//
// The broker runs its background work under a context that ends the
// moment the term does and that carries the term's Fence (WithFence), so
// a store can refuse the writes of a broker that was deposed while they
// were in flight (see Fence).
type Leadership interface {
	// Campaign blocks until this broker leads its group and returns the
	// term, or returns ctx's error when ctx ends first, or another error
	// when the election cannot be held (the store is unreachable); the
	// broker then campaigns again after a pause.
	Campaign(ctx context.Context) (Term, error)
}

// Term is one leadership term of one broker.
type Term interface {
	// Done is closed the moment the term ends: the session that holds it
	// expired or could not be kept alive, or another broker was elected.
	Done() <-chan struct{}
	// Confirm asks the store, with a linearizable read, whether the term
	// still holds; ErrNotLeader when it does not. PostgreSQL cannot be
	// fenced, so the broker confirms before each DROP it decides on its
	// own (reconciliation, intent settlement).
	Confirm(ctx context.Context) error
	// Fence is what leader-only writes of this term compare.
	Fence() Fence
	// Resign ends the term early (the broker is closing), so that another
	// broker is elected at once rather than after the session's TTL.
	Resign(ctx context.Context) error
}

// Fence makes a store write conditional on a leadership term: the write
// commits only if the key Key still exists at the create revision Revision
// (etcd: Compare(CreateRevision(Key), "=", Revision) on the election key,
// which the election deletes when the term ends). A store that has no
// group to lead in (bbolt) ignores it. A write that fails its fence
// returns an error wrapping ErrNotLeader and changes nothing.
type Fence struct {
	Key      string
	Revision int64
}

type fenceKey struct{}

// WithFence returns a context whose store writes carry f.
func WithFence(ctx context.Context, f Fence) context.Context {
	return context.WithValue(ctx, fenceKey{}, f)
}

// FenceFrom returns the fence a store write made under ctx must compare,
// if any.
func FenceFrom(ctx context.Context) (Fence, bool) {
	f, ok := ctx.Value(fenceKey{}).(Fence)
	return f, ok && f.Key != ""
}

// termRetryDelay is the pause between failed campaigns (the store is
// unreachable): long enough not to spin, short beside a session TTL.
const termRetryDelay = 500 * time.Millisecond

// lead campaigns for leadership until ctx ends and runs the background
// work during each term won: start-up of the term (reconciliation, the
// expiry queue rebuilt from the store) and then the expiry manager and
// the maintenance loop, under a context that ends with the term.
func (b *Broker) lead(ctx context.Context) {
	for ctx.Err() == nil {
		term, err := b.cfg.Leadership.Campaign(ctx)
		if err != nil {
			if ctx.Err() == nil {
				b.log.Warn("leader election failed; trying again", "err", err)
				select {
				case <-ctx.Done():
				case <-b.clock.After(termRetryDelay):
				}
			}
			continue
		}
		b.runTerm(ctx, term)
	}
}

// runTerm runs one term's work and returns when the term or ctx ends,
// once the work has stopped.
func (b *Broker) runTerm(ctx context.Context, term Term) {
	termCtx, cancel := context.WithCancel(WithFence(ctx, term.Fence()))
	defer cancel()
	go func() {
		select {
		case <-term.Done():
			cancel()
		case <-termCtx.Done():
		}
	}()
	b.setTerm(term)
	defer b.setTerm(nil)
	// Leading (leader.go) follows the term: the feed-driven paths that only
	// a leader runs (takeover of stuck revocations, disconnect revocations
	// of the whole group) check it.
	b.SetLeading(true)
	defer b.SetLeading(false)
	if err := b.beginTerm(termCtx); err != nil {
		if termCtx.Err() == nil {
			b.log.Warn("could not take up leadership; resigning", "err", err)
			rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
			_ = term.Resign(rctx)
			rcancel()
		}
		return
	}
	// The next term must not start while this one's loops still run.
	var wg sync.WaitGroup
	wg.Go(func() { b.dispatch(termCtx) })
	wg.Go(func() { b.maintenanceLoop(termCtx) })
	if b.cfg.ActivityInterval > 0 && b.samplesActivity() {
		wg.Go(func() { b.activityLoop(termCtx) })
	}
	<-termCtx.Done()
	wg.Wait()
	if ctx.Err() != nil {
		// Closing: hand leadership over now rather than after the TTL.
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		_ = term.Resign(rctx)
		rcancel()
	}
}

// beginTerm is what a broker does on taking up leadership (and a sole
// broker at Start): settle what the previous leader or run left behind,
// rebuild the expiry queue from the store, and re-arm the stream
// deadlines of revoke_on_disconnect leases.
func (b *Broker) beginTerm(ctx context.Context) error {
	b.resetSuspects()
	if _, err := b.Reconcile(ctx); err != nil {
		// A target that is down must not keep the broker from serving
		// the others; the periodic reconciler tries again.
		b.log.Warn("start-up reconciliation incomplete", "err", err)
	}
	// A usable lease the change feed (follow.go) told of is queued
	// already, at its exact expiry: the index's instant may be earlier
	// (ScanExpiry), and taking it would have the new leader read every
	// renewed lease at once, in the middle of a failover. The feed
	// delivers whatever changed since. The others are queued at the
	// index's instant, which is never late: no feed, a lease the feed has
	// not told of yet, and revocations under way, which a new leader
	// takes over at once, as at a start (the feed queued them for later,
	// in case the instance that began them was alive).
	n := 0
	err := b.store.ScanExpiry(ctx, func(e ExpiryEntry) bool {
		n++
		if e.State.Usable() && b.feedKnowsUsable(e.LeaseID) {
			return true
		}
		b.queue.Set(e.LeaseID, e.Expire)
		b.queue.SetTarget(e.LeaseID, e.Target) // "" when the index lacks it
		return true
	})
	if err != nil {
		return fmt.Errorf("rebuild expiry queue: %w", err)
	}
	b.log.Info("expiry queue rebuilt", "live_leases", n)
	b.restoreStreamDeadlines(ctx)
	return nil
}

// setTerm records the term in force (nil: none).
func (b *Broker) setTerm(t Term) {
	b.termMu.Lock()
	b.term = t
	b.termMu.Unlock()
}

// confirmLeading returns nil when this broker may run a DROP it decided
// on itself: it is its group's only member, or its term still holds (a
// linearizable read); ErrNotLeader otherwise.
func (b *Broker) confirmLeading(ctx context.Context) error {
	if b.cfg.Leadership == nil {
		return nil
	}
	b.termMu.Lock()
	t := b.term
	b.termMu.Unlock()
	if t == nil {
		return ErrNotLeader
	}
	select {
	case <-t.Done():
		return ErrNotLeader
	default:
	}
	if err := t.Confirm(ctx); err != nil {
		if errors.Is(err, ErrNotLeader) {
			return err
		}
		return fmt.Errorf("%w: leadership could not be confirmed: %w", ErrNotLeader, err)
	}
	return nil
}
