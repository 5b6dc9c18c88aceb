package credbroker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// EventType says what happened to a Keeper's credential.
type EventType int

const (
	// EventIssued: a credential was issued (at start, or after the current
	// one was revoked, expired or lost). Credential is the new one.
	EventIssued EventType = iota + 1
	// EventRenewed: the current lease was renewed.
	EventRenewed
	// EventMaxTTLReached: the current lease cannot grow any more; a
	// replacement follows.
	EventMaxTTLReached
	// EventReplaced: a fresh credential replaced the current one before its
	// max TTL (make-before-break). Credential is the new one; Old is the
	// lease that keeps working until it is retired after the overlap.
	EventReplaced
	// EventRetired: the old credential of a replacement was let go (revoked,
	// unless KeeperOptions.KeepRetired).
	EventRetired
	// EventRevoked, EventExpired, EventNotFound: the current lease is gone;
	// a fresh credential follows (EventIssued).
	EventRevoked
	EventExpired
	EventNotFound
	// EventDisconnected and EventReconnected: the shared KeepAlive stream
	// broke (Err says why) or came up (the first time too).
	EventDisconnected
	EventReconnected
	// EventError: a renewal or an issue failed (Err says why); the Keeper
	// retries (but see KeeperOptions.StopOnPermanentError).
	EventError
)

// EventRotated is the former name of EventReplaced.
//
// Deprecated: use EventReplaced.
const EventRotated = EventReplaced

var eventNames = [...]string{"", "issued", "renewed", "max_ttl_reached", "replaced", "retired",
	"revoked", "expired", "not_found", "disconnected", "reconnected", "error"}

func (t EventType) String() string {
	if t < 0 || int(t) >= len(eventNames) {
		return "unknown"
	}
	return eventNames[t]
}

// Event is a change a Keeper reports.
type Event struct {
	Type  EventType
	Lease Lease
	// Credential is set for EventIssued and EventReplaced.
	Credential *Credential
	// Old is the outgoing lease of EventReplaced, the retired one of
	// EventRetired.
	Old *Lease
	Err error
}

// KeeperOptions configure a Keeper.
type KeeperOptions struct {
	// Issue is what each credential is issued with.
	Issue IssueRequest
	// Increment is asked for on each renewal (zero: the role's default TTL).
	Increment time.Duration
	// Overlap is how long a replaced credential keeps working after
	// its successor was delivered, so in-flight work finishes and pools
	// drain (default 30s; never past the old lease's expiry).
	Overlap time.Duration
	// ReplaceBefore is how long before the lease's max expiry the Keeper
	// issues its successor (default: twice the Overlap, at least a tenth
	// of the lease's lifetime). It is capped at half the lifetime.
	ReplaceBefore time.Duration
	// RotateBefore is the former name of ReplaceBefore, used when
	// ReplaceBefore is zero.
	//
	// Deprecated: use ReplaceBefore.
	RotateBefore time.Duration
	// KeepRetired lets a retired lease run out instead of revoking it.
	KeepRetired bool
	// OnEvent, if set, is called synchronously on the Keeper's goroutine
	// before the event is offered on Events. A pool uses it to switch
	// credentials before anyone else hears of a replacement. It must not block.
	OnEvent func(Event)
	// Backoff paces retries of failed issues (defaults as Backoff).
	Backoff Backoff
	// StopOnPermanentError ends Run, returning the error, when the broker
	// refuses to issue a credential, or refuses the KeepAlive stream, with
	// an error that retrying cannot change (see IsPermanent): an unknown
	// role, a revoked token. Without it the Keeper retries with Backoff
	// forever, which suits a library inside a long-running service that an
	// operator may fix under it; a sidecar that a supervisor restarts
	// rather wants to stop and say why.
	StopOnPermanentError bool
}

// IsPermanent reports whether err is the broker's refusal that the same
// request will meet again: InvalidArgument, NotFound (an unknown role),
// PermissionDenied, Unauthenticated (a missing or revoked token) and
// Unimplemented (not a credbroker). Everything else — Unavailable,
// DeadlineExceeded, ResourceExhausted, Aborted, Internal (what brokerd
// answers when its database fails), a broken connection — may pass and is
// worth retrying.
func IsPermanent(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.NotFound, codes.PermissionDenied, codes.Unauthenticated, codes.Unimplemented:
		return true
	}
	return false
}

// Keeper holds one credential alive: it issues it, renews it over the
// client's shared KeepAlive stream at about two thirds of its remaining
// TTL (with jitter), issues a fresh one when the broker revokes or
// expires it, and before its max TTL replaces it make-before-break: it
// issues a successor first and retires the old one only after the overlap.
type Keeper struct {
	c    *Client
	opts KeeperOptions
	in   *inbox

	events chan Event
	ready  chan struct{}

	mu    sync.Mutex
	cur   *held // the current credential
	old   *held // the replaced one, until retired
	ran   bool
	ended chan struct{}
}

type held struct {
	lease    Lease
	cred     Credential
	retireAt time.Time // for the old one
}

// eventBuffer is how many events wait on Events before the oldest are dropped.
const eventBuffer = 64

// NewKeeper returns a Keeper; call Run.
func (c *Client) NewKeeper(opts KeeperOptions) *Keeper {
	if opts.Overlap <= 0 {
		opts.Overlap = 30 * time.Second
	}
	if opts.ReplaceBefore == 0 {
		opts.ReplaceBefore = opts.RotateBefore
	}
	opts.Backoff = opts.Backoff.withDefaults()
	return &Keeper{
		c: c, opts: opts, in: newInbox(),
		events: make(chan Event, eventBuffer),
		ready:  make(chan struct{}),
		ended:  make(chan struct{}),
	}
}

// Events delivers what happens, in order. A reader that falls behind by
// more than 64 events loses the oldest; Current is always up to date.
func (k *Keeper) Events() <-chan Event { return k.events }

// Ready is closed once the first credential is held.
func (k *Keeper) Ready() <-chan struct{} { return k.ready }

// Current returns the credential to use now; ok is false before the
// first one is issued.
func (k *Keeper) Current() (l Lease, c Credential, ok bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.cur == nil {
		return Lease{}, Credential{}, false
	}
	return k.cur.lease, k.cur.cred, true
}

// Connected reports whether the shared KeepAlive stream is up.
func (k *Keeper) Connected() bool { return k.c.stream.isConnected() }

// Run issues the first credential and keeps credentials alive until ctx
// is done; it then returns ctx's error. With
// KeeperOptions.StopOnPermanentError it also returns, with the broker's
// error, on a permanent refusal; it does not log that error (the caller
// reports it). It does not revoke on return: call Revoke for that. Run may
// be called once.
func (k *Keeper) Run(ctx context.Context) error {
	k.mu.Lock()
	if k.ran {
		k.mu.Unlock()
		return errors.New("credbroker: Keeper.Run called twice")
	}
	k.ran = true
	k.mu.Unlock()
	defer close(k.ended)
	k.c.stream.register(k.in)
	defer k.c.stream.unregister(k.in)

	r := &keeperRun{k: k, ctx: ctx}
	return r.loop()
}

// Revoke revokes the current and the retiring lease (on shutdown). It
// waits for Run to return when Run was started, so no new lease appears
// behind it; cancel Run's context first.
func (k *Keeper) Revoke(ctx context.Context) error {
	k.mu.Lock()
	ran := k.ran
	k.mu.Unlock()
	if ran {
		select {
		case <-k.ended:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	k.mu.Lock()
	var ids []string
	for _, h := range []*held{k.cur, k.old} {
		if h != nil {
			ids = append(ids, h.lease.ID)
		}
	}
	k.mu.Unlock()
	var errs []error
	for _, id := range ids {
		if _, err := k.c.Revoke(ctx, id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// keeperRun is the state of Run's goroutine.
type keeperRun struct {
	k   *Keeper
	ctx context.Context

	renewAt   time.Time // next renewal of cur; zero: none due
	replaceAt time.Time // when to issue cur's successor
	issueAt   time.Time // when to retry a failed issue; zero: no issue pending
	failures  int
	replacing bool // the issue pending is a replacement (cur still valid)
	// stopErr, once set, ends Run (StopOnPermanentError).
	stopErr error
}

func (r *keeperRun) loop() error {
	k := r.k
	r.issueAt = time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		if err := r.ctx.Err(); err != nil {
			return err
		}
		if r.stopErr != nil {
			return r.stopErr
		}
		now := time.Now()
		if !r.issueAt.IsZero() && !now.Before(r.issueAt) {
			r.issue()
			continue
		}
		if !r.renewAt.IsZero() && !now.Before(r.renewAt) {
			r.renew(now)
		}
		if !r.replaceAt.IsZero() && !now.Before(r.replaceAt) && r.issueAt.IsZero() {
			r.startReplacement("max TTL ahead")
			continue
		}
		if old := r.old(); old != nil && !now.Before(old.retireAt) {
			r.retire()
		}
		timer.Reset(r.nextWake(now))
		select {
		case <-r.ctx.Done():
			return r.ctx.Err()
		case <-timer.C:
		case <-k.in.ready:
			for _, m := range k.in.take() {
				r.handle(m)
			}
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
	}
}

func (r *keeperRun) nextWake(now time.Time) time.Duration {
	next := now.Add(time.Hour)
	for _, t := range []time.Time{r.renewAt, r.replaceAt, r.issueAt} {
		if !t.IsZero() && t.Before(next) {
			next = t
		}
	}
	if old := r.old(); old != nil && old.retireAt.Before(next) {
		next = old.retireAt
	}
	return max(next.Sub(now), 0)
}

func (r *keeperRun) cur() *held {
	r.k.mu.Lock()
	defer r.k.mu.Unlock()
	return r.k.cur
}

func (r *keeperRun) old() *held {
	r.k.mu.Lock()
	defer r.k.mu.Unlock()
	return r.k.old
}

func (r *keeperRun) emit(ev Event) {
	k := r.k
	if k.opts.OnEvent != nil {
		k.opts.OnEvent(ev)
	}
	for {
		select {
		case k.events <- ev:
			return
		default:
		}
		select {
		case <-k.events: // full: the oldest goes
		default:
		}
	}
}

// issue issues a credential: the first, a fresh one for a lost one, or
// the successor of a replacement.
func (r *keeperRun) issue() {
	k := r.k
	ctx, cancel := context.WithTimeout(r.ctx, 30*time.Second)
	lease, cred, err := k.c.Issue(ctx, k.opts.Issue)
	cancel()
	if err != nil {
		if r.ctx.Err() != nil {
			return
		}
		if k.opts.StopOnPermanentError && IsPermanent(err) {
			r.stopErr = fmt.Errorf("credbroker: issuing a credential for role %q: %w", k.opts.Issue.Role, err)
			return
		}
		r.failures++
		d := k.opts.Backoff.delay(r.failures)
		r.issueAt = time.Now().Add(d)
		k.c.log.Warn("issuing a credential failed; retrying", "role", k.opts.Issue.Role, "err", err, "retry_in", d.Round(time.Millisecond))
		r.emit(Event{Type: EventError, Err: err})
		return
	}
	r.failures = 0
	r.issueAt = time.Time{}
	replacement := r.replacing
	r.replacing = false

	k.mu.Lock()
	prev := k.cur
	var alsoRetire *held
	if replacement && prev != nil {
		alsoRetire = k.old // a replacement before the last one retired
		retireAt := time.Now().Add(k.opts.Overlap)
		if prev.lease.ExpireTime.Before(retireAt) {
			retireAt = prev.lease.ExpireTime
		}
		k.old = &held{lease: prev.lease, cred: prev.cred, retireAt: retireAt}
	}
	k.cur = &held{lease: lease, cred: cred}
	k.mu.Unlock()
	if alsoRetire != nil {
		r.letGo(alsoRetire)
	}

	k.c.stream.watch(lease.ID, k.opts.Increment, k.in)
	r.schedule(lease)
	k.c.log.Info("credential issued", "lease_id", lease.ID, "role", lease.Role, "username", lease.Username,
		"expire_time", lease.ExpireTime, "replacement", replacement)
	c := cred
	if replacement && prev != nil {
		o := prev.lease
		r.emit(Event{Type: EventReplaced, Lease: lease, Credential: &c, Old: &o})
	} else {
		r.emit(Event{Type: EventIssued, Lease: lease, Credential: &c})
	}
	select {
	case <-k.ready:
	default:
		close(k.ready)
	}
}

// schedule plans cur's next renewal and its replacement.
func (r *keeperRun) schedule(l Lease) {
	now := time.Now()
	r.renewAt = time.Time{}
	if l.ExpireTime.Before(l.MaxExpireTime) {
		left := l.ExpireTime.Sub(now)
		wait := left * 2 / 3
		// ±10% jitter, so that a fleet started together spreads out.
		wait += jitter(wait/5) - wait/10
		r.renewAt = now.Add(max(wait, 0))
	}
	life := l.MaxExpireTime.Sub(l.IssueTime)
	before := r.k.opts.ReplaceBefore
	if before <= 0 {
		before = max(2*r.k.opts.Overlap, life/10)
	}
	// Never more than half the lifetime: a successor due at once would be
	// due at once again, issuing without end.
	before = min(before, life/2)
	r.replaceAt = l.MaxExpireTime.Add(-before)
}

func (r *keeperRun) renew(now time.Time) {
	cur := r.cur()
	if cur == nil {
		r.renewAt = time.Time{}
		return
	}
	r.k.c.stream.renew(cur.lease.ID, r.k.opts.Increment)
	// If no answer comes (the stream is down), ask again later; an answer
	// reschedules from the renewed expiry.
	left := cur.lease.ExpireTime.Sub(now)
	r.renewAt = now.Add(max(left/3, time.Second))
}

func (r *keeperRun) startReplacement(why string) {
	if cur := r.cur(); cur != nil {
		r.k.c.log.Info("replacing credential", "lease_id", cur.lease.ID, "reason", why)
	}
	r.replacing = true
	r.replaceAt = time.Time{}
	r.issueAt = time.Now()
}

// retire lets the old credential go once its overlap is over.
func (r *keeperRun) retire() {
	k := r.k
	k.mu.Lock()
	old := k.old
	k.old = nil
	k.mu.Unlock()
	if old != nil {
		r.letGo(old)
	}
}

func (r *keeperRun) letGo(h *held) {
	k := r.k
	k.c.stream.unwatch(h.lease.ID)
	l := h.lease
	r.emit(Event{Type: EventRetired, Lease: l, Old: &l})
	if k.opts.KeepRetired {
		return
	}
	// Revoking waits for the user's sessions to end; the Keeper does not.
	go func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), 30*time.Second)
		defer cancel()
		if _, err := k.c.Revoke(ctx, l.ID); err != nil {
			k.c.log.Warn("revoking a retired credential failed; it expires on its own", "lease_id", l.ID, "err", err)
		} else {
			k.c.log.Info("retired credential revoked", "lease_id", l.ID)
		}
	}()
}

func (r *keeperRun) handle(m streamMsg) {
	switch {
	case m.disconnected:
		r.emit(Event{Type: EventDisconnected, Err: m.err})
		if r.k.opts.StopOnPermanentError && IsPermanent(m.err) {
			r.stopErr = fmt.Errorf("credbroker: KeepAlive stream: %w", m.err)
		}
		return
	case m.connected:
		r.emit(Event{Type: EventReconnected})
		return
	}
	resp := m.resp
	l := leaseFromProto(resp.GetLease())
	cur, old := r.cur(), r.old()
	switch {
	case cur != nil && l.ID == cur.lease.ID:
	case old != nil && l.ID == old.lease.ID:
		if terminal(resp.GetEvent()) {
			r.k.mu.Lock()
			r.k.old = nil
			r.k.mu.Unlock()
			r.k.c.stream.unwatch(l.ID)
		}
		return
	default:
		return
	}

	switch resp.GetEvent() {
	case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED:
		r.update(l)
		r.emit(Event{Type: EventRenewed, Lease: l})
	case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_MAX_TTL_REACHED:
		// The successor is issued at replaceAt, which schedule keeps
		// ahead of the max expiry: replacing right now would loop for a
		// role whose default TTL is its max (every new lease starts at
		// the cap).
		r.update(l)
		r.emit(Event{Type: EventMaxTTLReached, Lease: l})
	case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED,
		pb.KeepAliveEvent_KEEP_ALIVE_EVENT_EXPIRED,
		pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND:
		t := map[pb.KeepAliveEvent]EventType{
			pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED:   EventRevoked,
			pb.KeepAliveEvent_KEEP_ALIVE_EVENT_EXPIRED:   EventExpired,
			pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND: EventNotFound,
		}[resp.GetEvent()]
		r.k.c.log.Warn("credential lost; issuing a fresh one", "lease_id", l.ID, "event", t.String())
		r.k.c.stream.unwatch(l.ID)
		if l.IssueTime.IsZero() {
			l = cur.lease
		}
		r.emit(Event{Type: t, Lease: l})
		// The current credential is dead: no overlap to offer. The
		// retiring one, if any, stays until its own time.
		r.k.mu.Lock()
		r.k.cur = nil
		r.k.mu.Unlock()
		r.renewAt, r.replaceAt = time.Time{}, time.Time{}
		r.replacing = false
		r.issueAt = time.Now()
	default:
		// Not a lifecycle event: the broker could not renew now (its
		// database is down, say). Ask again soon.
		err := errors.New(resp.GetMessage())
		r.k.c.log.Warn("renewal failed; retrying", "lease_id", l.ID, "err", err)
		r.emit(Event{Type: EventError, Lease: cur.lease, Err: err})
		r.failures++
		retry := time.Now().Add(r.k.opts.Backoff.delay(r.failures))
		if r.renewAt.IsZero() || retry.Before(r.renewAt) {
			r.renewAt = retry
		}
	}
}

// update records a renewed lease and reschedules.
func (r *keeperRun) update(l Lease) {
	r.k.mu.Lock()
	if r.k.cur != nil && r.k.cur.lease.ID == l.ID {
		r.k.cur.lease = l
	}
	r.k.mu.Unlock()
	r.failures = 0
	r.schedule(l)
	if r.replacing || !r.issueAt.IsZero() {
		r.replaceAt = time.Time{}
	}
}

func terminal(e pb.KeepAliveEvent) bool {
	switch e {
	case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_EXPIRED,
		pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND:
		return true
	}
	return false
}
