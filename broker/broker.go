package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// cleanupTimeout bounds the work done on a detached context to undo a
// half-finished issue after the caller went away.
const cleanupTimeout = 30 * time.Second

// Broker issues, renews and revokes leases. Its methods are safe for
// concurrent use.
type Broker struct {
	// cfg is the configuration New was given, with defaults filled in;
	// what Reconfigure may change (roles, expiry settings) is read from
	// live instead (reconfigure.go).
	cfg   Config
	live  atomic.Pointer[settings]
	store LeaseStore
	dbs   map[string]Database
	clock Clock
	log   *slog.Logger
	// abandonAfter is the timer of abandonIssue's pauses between tries:
	// time's, or a test's (set before the broker is used).
	abandonAfter func(time.Duration) <-chan time.Time

	queue   *ExpiryQueue
	leaseMu keyedMutex
	hub     eventHub
	// watchers are told of every lifecycle event, like the Auditor (audit.go).
	watchers lifecycleWatchers
	// renewals batches concurrent renewals per target (renewbatch.go).
	renewals batcher[*renewCall]
	// revocations batches concurrent requested revocations per target
	// (revokebatch.go).
	revocations batcher[*revokeCall]
	limiter     *rate.Limiter
	// storeFails counts, per lease, consecutive store errors that kept a
	// revocation from going on, for requeue's backoff.
	storeFailMu sync.Mutex
	storeFails  map[string]int
	// lanes are the expiry manager's revocation lanes, one per target
	// (expiry.go); the map is fixed at New.
	lanes map[string]*revokeLane

	streamsMu sync.Mutex
	streams   map[string]*streamState

	// inflight holds the ids of issues between intent and lease, which the
	// reconciler must leave alone.
	inflightMu sync.Mutex
	inflight   map[string]struct{}

	// activity is the activity sampler's state (activity.go).
	activity activityState

	// group is the broker group's id and the marker roles claimed for it
	// (group.go).
	group groupState

	// pool holds reservations for issues (issuepool.go); poolCtx is set by
	// Start and ends at Close.
	pool    issuePool
	poolCtx context.Context
	// promos are the issued leases waiting to be written as Active
	// (promote.go).
	promos promotions

	// term is the leadership term in force (leadership.go); nil when not
	// leading, and always nil for a broker without Config.Leadership.
	termMu sync.Mutex
	term   Term
	// suspects are the users and intents the reconciler found unknown and
	// has not dropped yet, with when it first did (reconcile.go).
	suspectMu sync.Mutex
	suspects  map[string]time.Time
	// leadSwitch says whether this instance runs the background work
	// (leader.go); feed is what the store's change feed told it
	// (follow.go).
	leadSwitch leadership
	feed       feedState

	startOnce sync.Once
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closed    chan struct{}
	closeOnce sync.Once
}

// New validates cfg and returns a Broker. Call Start before serving.
func New(cfg Config) (*Broker, error) {
	if cfg.Store == nil {
		return nil, errors.New("broker: Config.Store is required")
	}
	if cfg.Clock == nil {
		cfg.Clock = SystemClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	// Not reloadable: the sampling loop starts with the broker (or its term).
	if cfg.ActivityInterval == 0 {
		cfg.ActivityInterval = DefaultActivityInterval
	}
	if cfg.IssuePool == 0 {
		cfg.IssuePool = DefaultIssuePool
	}
	if cfg.RenewBatches <= 0 {
		cfg.RenewBatches = DefaultRenewBatches
	}
	if cfg.RenewLinger == 0 {
		cfg.RenewLinger = DefaultRenewLinger
	}
	live, err := newSettings(cfg)
	if err != nil {
		return nil, err
	}
	cfg = live.cfg
	if cfg.Instance == "" {
		cfg.Instance = "broker-" + newLeaseID()[:8]
	}
	b := &Broker{
		cfg:        cfg,
		store:      cfg.Store,
		dbs:        cfg.Databases,
		clock:      cfg.Clock,
		log:        cfg.Logger,
		queue:      NewExpiryQueue(),
		limiter:    rate.NewLimiter(rate.Limit(cfg.RevokeRate), cfg.RevokeConcurrency),
		streams:    make(map[string]*streamState),
		inflight:   make(map[string]struct{}),
		closed:     make(chan struct{}),
		storeFails: make(map[string]int),
		lanes:      newRevokeLanes(cfg.Databases),
	}
	b.live.Store(live)
	// Real time, not the broker's Clock: the pause is how long a failed
	// Issue keeps its caller (and the lease's lock) waiting, bounded in
	// real time like cleanupTimeout's context around it; the Clock is
	// lease time, which a test's fake clock holds still, and the batchers'
	// linger is real time too.
	b.abandonAfter = time.After
	b.renewals = newBatcher(cfg.RenewBatches, maxRenewBatch, cfg.RenewLinger, b.renewBatch, &b.wg)
	b.revocations = newBatcher(revokeBatches, maxRevokeBatch, revokeLinger, func(_ string, calls []*revokeCall) { b.revokeRequested(calls) }, &b.wg)
	// A group's broker (Leadership set) leads only during a term (runTerm).
	b.leadSwitch.init(!cfg.Standby && cfg.Leadership == nil)
	b.feed.init()
	return b, nil
}

func setDefault(d *time.Duration, def time.Duration) {
	if *d <= 0 {
		*d = def
	}
}

// Start claims the targets' marker roles for the broker's group and starts
// the background work. A broker that is its group's only member
// (Config.Leadership nil) leads at once: before Start returns it settles
// what a previous run left behind (intents, unknown marker-role members)
// and rebuilds the expiry queue from the store, and leases that expired
// while the broker was down are revoked right away, at the bounded
// revocation rate. A broker of a group campaigns for leadership in the
// background instead and does that work only while it leads
// (leadership.go); it serves calls either way. The background work
// includes, when a target can report its sessions, the activity sampler
// (activity.go).
func (b *Broker) Start(ctx context.Context) error {
	var err error
	b.startOnce.Do(func() {
		if _, err = b.groupID(ctx); err != nil {
			err = fmt.Errorf("broker: %w", err)
			return
		}
		if err = b.claimAll(ctx); err != nil {
			err = fmt.Errorf("broker: %w", err)
			return
		}
		loopCtx, cancel := context.WithCancel(context.Background())
		if b.cfg.Leadership == nil {
			if err = b.beginTerm(ctx); err != nil {
				cancel()
				err = fmt.Errorf("broker: %w", err)
				return
			}
		}
		b.cancel = cancel
		b.pool.mu.Lock()
		b.poolCtx = loopCtx
		b.pool.mu.Unlock()
		if err = b.startFollowing(ctx, loopCtx); err != nil {
			cancel()
			err = fmt.Errorf("broker: follow the store's changes: %w", err)
			return
		}
		if b.cfg.Leadership != nil {
			b.wg.Go(func() { b.lead(loopCtx) })
			return
		}
		b.startExpiryManager(loopCtx)
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.maintenanceLoop(loopCtx)
		}()
		if b.cfg.ActivityInterval > 0 && b.samplesActivity() {
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				b.activityLoop(loopCtx)
			}()
		}
	})
	return err
}

// Close stops the background loops and waits for them, and for the
// renewal and revocation batches under way (batcher.go), which use the
// store and the databases. It closes neither the store nor the databases.
func (b *Broker) Close() error {
	// Once: concurrent calls (a signal handler and a deferred Close) wait
	// for the first instead of closing b.closed twice.
	b.closeOnce.Do(func() {
		close(b.closed)
		b.stopPool()
		// Renewals and revocations still arriving run alone; the batches
		// under way are waited for below.
		b.renewals.close()
		b.revocations.close()
		if b.cancel != nil {
			b.cancel()
		}
		b.wg.Wait()
		b.FlushPromotions()
		b.drainPool()
	})
	return nil
}

// wallNow is the clock's time without its monotonic reading. Lease times
// are wall-clock instants, stored as such and compared with each other
// and with the expiry queue's entries, so every instant the lease
// lifecycle computes starts from this (see ExpiryQueue.Set).
func (b *Broker) wallNow() time.Time { return b.clock.Now().Round(0) }

func (b *Broker) db(target string) (Database, error) {
	db, ok := b.dbs[target]
	if !ok {
		return nil, fmt.Errorf("%w: target %q is not configured", ErrUnavailable, target)
	}
	return db, nil
}

// Issue creates a user for req.Role and leases it to req.Client.
//
// Crash safety: a durable record names the user before CREATE ROLE, and
// the credential is returned only once the user exists and the full lease
// is durable. The lease is written in the Issuing state beside CREATE
// ROLE rather than after it, so the credential waits for the slower of
// the two, not for both in turn, and is promoted to Active in the
// background (promote.go). With a reservation (issuepool.go) its intent
// is the record written ahead, and the Issuing lease (whose commit
// deletes the intent) commits while CREATE ROLE runs; without one, the
// Issuing lease itself is written first, while the password is hashed,
// and stands in for the intent. A crash leaves an intent (the reconciler
// drops its user) or an Issuing lease (the reconciler promotes it if its
// user exists, and removes it if not); see docs/architecture.md.
func (b *Broker) Issue(ctx context.Context, req IssueRequest) (Lease, Credential, error) {
	if err := ValidateRoleName(req.Role); err != nil {
		return Lease{}, Credential{}, err
	}
	role, ok := b.role(req.Role)
	if !ok {
		return Lease{}, Credential{}, fmt.Errorf("%w: %q", ErrRoleNotFound, req.Role)
	}
	if req.TTL < 0 {
		return Lease{}, Credential{}, fmt.Errorf("%w: ttl must not be negative", ErrInvalidArgument)
	}
	if err := ValidateMetadata(req.Metadata); err != nil {
		return Lease{}, Credential{}, err
	}
	db, err := b.db(role.Target)
	if err != nil {
		return Lease{}, Credential{}, err
	}
	if err := b.ensureClaimed(ctx, role.Target); err != nil {
		return Lease{}, Credential{}, err
	}
	ttl := req.TTL
	if ttl == 0 {
		ttl = role.DefaultTTL
	}
	if ttl > role.MaxTTL {
		ttl = role.MaxTTL
	}
	now := b.wallNow()
	lease := Lease{
		ID:                 newLeaseID(),
		Role:               role.Name,
		Client:             req.Client,
		Target:             role.Target,
		Username:           newUsername(role.Name),
		ProxyRole:          role.ProxyRole,
		IssueTime:          now,
		ExpireTime:         now.Add(ttl),
		MaxExpireTime:      now.Add(role.MaxTTL),
		State:              StateIssuing,
		Metadata:           copyMetadata(req.Metadata),
		RevokeOnDisconnect: req.RevokeOnDisconnect,
	}
	var password, verifier string
	r, pooled := b.takeReservation(role)
	if pooled && (r.intent.Target != role.Target || r.intent.ProxyRole != role.ProxyRole) {
		// Made before a reload changed the role.
		b.release([]reservation{r})
		pooled = false
	}
	if pooled {
		// Ready ahead (issuepool.go): the intent is durable already and
		// the password hashed; the reservation is in flight.
		password, verifier = r.password, r.verifier
		lease.ID, lease.Username = r.intent.LeaseID, r.intent.Username
	} else {
		password = NewPassword()
		b.setInflight(lease.ID, true)
	}
	defer b.setInflight(lease.ID, false)
	// Held until the issue is settled: a revocation of this id (an admin
	// who listed the Issuing lease) waits for it, rather than dropping a
	// user whose CREATE ROLE has not committed yet.
	unlock := b.leaseMu.Lock(lease.ID)
	defer unlock()
	log := b.log.With("lease_id", lease.ID, "role", lease.Role, "client", lease.Client, "username", lease.Username)
	// In a group, the leader removes an Issuing lease whose user two
	// sweeps ReconcileConfirm apart did not find, and this issue is not in
	// its memory: a CREATE ROLE that committed later would hand out a
	// credential without a lease. So CREATE ROLE gets half that long; past
	// it the issue is undone and answered Unavailable.
	userCtx, cancelUser := context.WithCancelCause(ctx)
	defer cancelUser(nil)
	if rc := b.cfg.ReconcileConfirm; rc > 0 {
		timeout := b.clock.After(rc / 2)
		go func() {
			select {
			case <-timeout:
				cancelUser(fmt.Errorf("%w: CREATE ROLE took longer than %v (half of the group's reconcile confirmation, store.etcd.session_ttl): the issue was undone", ErrUnavailable, rc/2))
			case <-userCtx.Done():
			}
		}()
	}
	newUser := func() error {
		err := db.NewUser(userCtx, NewUserRequest{
			Username:   lease.Username,
			Password:   password,
			ProxyRole:  lease.ProxyRole,
			ValidUntil: lease.ExpireTime.Add(b.conf().ValidUntilGrace),
			Verifier:   verifier,
		})
		if cause := context.Cause(userCtx); err != nil && ctx.Err() == nil && errors.Is(cause, ErrUnavailable) {
			return cause
		}
		return err
	}
	stored := lease // CreateLease sets its Revision
	if !pooled {
		// The Issuing lease is the record written before CREATE ROLE;
		// hash while its commit waits on its fsync.
		hashed := make(chan string, 1)
		if h, ok := db.(PasswordHasher); ok {
			go func() {
				v, _ := h.HashPassword(password) // on error NewUser hashes, and reports it
				hashed <- v
			}()
		} else {
			hashed <- ""
		}
		err := b.store.CreateLease(ctx, &stored)
		verifier = <-hashed
		if err != nil {
			if ours, _ := b.leaseStored(&stored, err, log); !ours {
				// No user exists. Should the lease land all the same,
				// it is Issuing without a user: the reconciler removes it.
				return Lease{}, Credential{}, storeLeaseError(err)
			}
		}
		if err := newUser(); err != nil {
			// The CREATE may have committed even though we saw an error (the
			// connection can drop after COMMIT), so drop the user either way.
			b.abandonIssue(stored, true, false, log)
			return Lease{}, Credential{}, fmt.Errorf("create user: %w", err)
		}
	} else {
		// The intent is durable: the lease's commit and CREATE ROLE
		// overlap.
		leaseErr := make(chan error, 1)
		go func() { leaseErr <- b.store.CreateLease(ctx, &stored) }()
		userErr := newUser()
		err := <-leaseErr
		ours := err == nil
		if err != nil {
			ours, _ = b.leaseStored(&stored, err, log)
		}
		if userErr != nil || !ours {
			b.abandonIssue(stored, ours, true, log)
			if userErr != nil {
				return Lease{}, Credential{}, fmt.Errorf("create user: %w", userErr)
			}
			return Lease{}, Credential{}, storeLeaseError(err)
		}
	}
	b.queue.Set(stored.ID, stored.ExpireTime)
	b.queue.SetTarget(stored.ID, stored.Target)
	if stored.RevokeOnDisconnect {
		b.armDisconnect(stored.ID, now.Add(b.conf().DisconnectGrace))
	}
	b.promote(stored)
	out := stored.Clone()
	out.State = out.State.Public()
	log.Info("lease issued", "expire_time", out.ExpireTime)
	b.audit(AuditIssue, out, "")
	ep := db.Endpoint()
	return out, Credential{
		Username: out.Username,
		Password: password,
		Host:     ep.Host,
		Port:     ep.Port,
		Database: ep.Database,
	}, nil
}

// storeLeaseError is what Issue reports of a CreateLease that failed.
func storeLeaseError(err error) error {
	if errors.Is(err, ErrUnknownOutcome) {
		return fmt.Errorf("%w: store lease: %w", ErrUnavailable, err)
	}
	return fmt.Errorf("store lease: %w", err)
}

// leaseStored settles a CreateLease that returned err. The write may have
// committed all the same (ErrUnknownOutcome, a context that ended while it
// was in flight), so the lease is read back: ours reports that it is
// stored (*l is set to it, and the issue goes on). known is false when
// even the read failed; the issue is undone then too, which is safe since
// the lease, if it landed, is Issuing, and the reconciler removes an
// Issuing lease whose user does not exist.
func (b *Broker) leaseStored(l *Lease, err error, log *slog.Logger) (ours, known bool) {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	stored, rerr := b.store.GetLease(ctx, l.ID)
	switch {
	case rerr == nil && stored.Username == l.Username:
		log.Warn("lease stored although the store reported an error; issuing it", "err", err)
		*l = stored
		return true, true
	case rerr == nil, errors.Is(rerr, ErrLeaseNotFound):
		// Not stored, or the id is another lease's (ErrExists).
		return false, true
	default:
		log.Warn("could not tell whether the lease was stored; undoing the issue, the reconciler settles the rest", "err", err, "read_err", rerr)
		return false, false
	}
}

// abandonIssue undoes a half-finished issue on a context of its own: the
// caller's may already be cancelled. It drops the user, then removes the
// records that name it: the Issuing lease when it is this issue's
// (leaseStored) and the reservation's intent (intent). If the drop fails,
// the reconciler finishes the job: the Issuing lease is replaced by an
// intent (handOver), whose user the reconciler drops, so that a failed
// issue leaves no lease behind. Should even that fail, the lease stays
// (the reconciler promotes an Issuing lease whose user exists) and is
// queued here, to be revoked at its expiry.
func (b *Broker) abandonIssue(l Lease, leaseStored, intent bool, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	db, err := b.db(l.Target)
	// A few tries, paused (abandonRetry): the drop is idempotent, and each
	// failure here leaves work to the reconciler.
	if err == nil {
		for try := 1; ; try++ {
			err = db.DeleteUser(ctx, DeleteUserRequest{Username: l.Username, ProxyRole: l.ProxyRole})
			if err == nil || !b.abandonRetry(ctx, try) {
				break
			}
		}
	}
	if err != nil {
		if leaseStored && b.handOver(ctx, l) {
			log.Warn("could not undo a failed issue; its user is left to the reconciler", "err", err)
			return
		}
		if leaseStored {
			b.queue.Set(l.ID, l.ExpireTime)
			b.queue.SetTarget(l.ID, l.Target)
		}
		log.Warn("could not undo a failed issue; the reconciler will retry", "err", err)
		return
	}
	if leaseStored {
		if err := b.store.DeleteLease(ctx, l.ID); err != nil {
			log.Warn("could not remove the lease of a failed issue; the reconciler will", "err", err)
		}
	}
	if intent {
		if err := b.store.DeleteIntent(ctx, l.ID); err != nil {
			log.Warn("could not remove the intent of a failed issue; the reconciler will", "err", err)
		}
	}
}

// handOver replaces the Issuing lease of a failed issue whose user could
// not be dropped by an intent naming that user, which the reconciler
// settles by dropping it. The intent is written first: at every instant a
// record names the user. It reports whether the lease is gone.
func (b *Broker) handOver(ctx context.Context, l Lease) bool {
	group, _ := b.groupID(ctx) // read at Start
	in := Intent{LeaseID: l.ID, Target: l.Target, Username: l.Username, ProxyRole: l.ProxyRole, CreateTime: b.wallNow(), Group: group}
	var err error
	for try := 1; ; try++ { // PutIntent replaces: retrying is safe
		if err = b.store.PutIntent(ctx, in); err == nil || !b.abandonRetry(ctx, try) {
			break
		}
	}
	if err != nil {
		return false
	}
	return b.store.DeleteLease(ctx, l.ID) == nil
}

// abandonTries is how many times abandonIssue tries each of its steps.
const abandonTries = 3

// abandonBasePause is abandonIssue's first pause between two tries of a
// step; each next one doubles. A step's pauses add up to at most
// abandonBasePause * (2^(abandonTries-1) - 1) (750ms), so a failed
// issue answers within about 1.5s of pauses more than its calls take,
// even when the drop and the hand-over both fail every time.
const abandonBasePause = 250 * time.Millisecond

// abandonRetry is called after try n (1-based) of one of abandonIssue's
// steps failed. It reports whether to try again: not after abandonTries,
// nor once ctx has ended; else it first pauses, so that a blip (a
// connection dropped, a store busy) has passed before the next try,
// with jitter over the pause's upper half so that issues that failed
// together do not retry in lockstep (as backoff does).
func (b *Broker) abandonRetry(ctx context.Context, n int) bool {
	if n >= abandonTries || ctx.Err() != nil {
		return false
	}
	d := abandonBasePause << (n - 1)
	half := d / 2
	select {
	case <-ctx.Done():
		return false
	case <-b.abandonAfter(half + time.Duration(jitter(int64(half)+1))):
		return true
	}
}

func copyMetadata(md map[string]string) map[string]string {
	if len(md) == 0 {
		return nil
	}
	out := make(map[string]string, len(md))
	for k, v := range md {
		out[k] = v
	}
	return out
}

// Renew extends a lease to now + increment (zero: the role's default TTL),
// never past its MaxExpireTime and never shorter than it already is.
func (b *Broker) Renew(ctx context.Context, id string, increment time.Duration) (Lease, error) {
	if err := ValidateLeaseID(id); err != nil {
		return Lease{}, err
	}
	if increment < 0 {
		return Lease{}, fmt.Errorf("%w: increment must not be negative", ErrInvalidArgument)
	}
	// Renewals arriving together are committed together (renewbatch.go);
	// what the batch cannot settle plainly comes back here.
	l, err := b.renewBatched(ctx, id, increment)
	if !errors.Is(err, errRenewAlone) {
		return l, err
	}
	userOnly := errors.Is(err, errRenewUserAlone)
	unlock := b.leaseMu.Lock(id)
	defer func() { unlock() }()
	for {
		l, err := b.store.GetLease(ctx, id)
		if err != nil {
			return Lease{}, err
		}
		now := b.wallNow()
		switch {
		case l.State == StateExpired:
			return l, fmt.Errorf("%w: lease %s expired at %s", ErrLeaseExpired, id, l.EndTime.UTC().Format(time.RFC3339))
		case !l.State.Usable():
			return l, fmt.Errorf("%w: lease %s is %s", ErrLeaseRevoked, id, l.State)
		case !now.Before(l.ExpireTime):
			return l, fmt.Errorf("%w: lease %s expired at %s", ErrLeaseExpired, id, l.ExpireTime.UTC().Format(time.RFC3339))
		}
		newExpire := b.renewedExpiry(l, now, increment)
		if !newExpire.After(l.ExpireTime) && !userOnly && !l.ValidUntilBehind {
			// Nothing to extend: at the cap, or asked for less than it has.
			b.publishRenewal(l)
			return l, nil
		}
		userOnly = false
		newExpire = later(newExpire, l.ExpireTime)
		db, err := b.db(l.Target)
		if err != nil {
			return l, err
		}
		// PostgreSQL first: if the store write then fails, VALID UNTIL is
		// merely later than the lease, and the expiry manager still drops
		// the user at the lease's expiry.
		if err := db.RenewUser(ctx, RenewUserRequest{Username: l.Username, ValidUntil: newExpire.Add(b.conf().ValidUntilGrace)}); err != nil {
			if errors.Is(err, ErrUserNotFound) {
				// Dropped behind the broker's back: the credential is dead,
				// so the lease ends now rather than pretending to live on.
				unlock()
				b.log.Warn("lease's user was dropped outside the broker; revoking the lease", "lease_id", id, "username", l.Username)
				ended, _, rerr := b.revoke(ctx, id, causeRequest)
				unlock = func() {}
				if rerr != nil {
					return ended, fmt.Errorf("renew user: %w", err)
				}
				return ended, fmt.Errorf("%w: lease %s: its database user no longer exists", ErrLeaseRevoked, id)
			}
			return l, fmt.Errorf("renew user: %w", err)
		}
		l.ExpireTime = newExpire
		l.ValidUntilBehind = false // PostgreSQL has it now
		stored, err := b.store.UpdateLease(ctx, l)
		if errors.Is(err, ErrConflict) {
			continue
		}
		if err != nil {
			return l, fmt.Errorf("store lease: %w", err)
		}
		b.queue.Set(id, stored.ExpireTime)
		b.publishRenewal(stored)
		return stored.Clone(), nil
	}
}

func (b *Broker) publishRenewal(l Lease) {
	// Every successful renewal, batched or alone, passes here.
	b.audit(AuditRenew, l, "")
	t := EventRenewed
	if !l.ExpireTime.Before(l.MaxExpireTime) {
		t = EventMaxTTLReached
	}
	b.hub.publish(Event{Type: t, Lease: l.Clone()})
}

// renewedExpiry is the expiry a renewal of l at now asks for: now plus
// increment (zero: the role's default TTL), never past MaxExpireTime.
// Both renewal paths, batched and alone, take it from here.
func (b *Broker) renewedExpiry(l Lease, now time.Time, increment time.Duration) time.Time {
	if increment == 0 {
		increment = b.defaultTTL(l)
	}
	e := now.Add(increment)
	if e.After(l.MaxExpireTime) {
		return l.MaxExpireTime
	}
	return e
}

// defaultTTL is the lease's role's default TTL; for a role that has left
// the configuration, the lease's original TTL.
func (b *Broker) defaultTTL(l Lease) time.Duration {
	if r, ok := b.role(l.Role); ok {
		return r.DefaultTTL
	}
	return l.MaxExpireTime.Sub(l.IssueTime)
}

// Lookup returns a lease, in its public state (LeaseState.Public).
func (b *Broker) Lookup(ctx context.Context, id string) (Lease, error) {
	if err := ValidateLeaseID(id); err != nil {
		return Lease{}, err
	}
	l, err := b.store.GetLease(ctx, id)
	l.State = l.State.Public()
	return l, err
}

// LookupOwner returns lease id for authorizing a call on it: its ID, Role
// and Client, which never change for a lease, are exact; every other
// field may be of an older version (a hint, storereads.go: on etcd, no
// read through raft when this instance wrote, read or followed the
// lease), so a caller must not answer from them. A lease the hint does
// not know is read afresh before ErrLeaseNotFound is believed: a lease
// just issued on another instance may not have reached this one yet.
func (b *Broker) LookupOwner(ctx context.Context, id string) (Lease, error) {
	if err := ValidateLeaseID(id); err != nil {
		return Lease{}, err
	}
	h, ok := b.store.(LeaseHinter)
	if !ok {
		return b.Lookup(ctx, id)
	}
	l, err := h.LeaseHint(ctx, id)
	if errors.Is(err, ErrLeaseNotFound) {
		l, err = b.store.GetLease(ctx, id)
	}
	l.State = l.State.Public()
	return l, err
}

// ListLeases lists leases matching f, in their public state
// (LeaseState.Public); see LeaseStore.ListLeases.
func (b *Broker) ListLeases(ctx context.Context, f LeaseFilter) ([]Lease, string, error) {
	if f.After != "" {
		if err := ValidateLeaseID(f.After); err != nil {
			return nil, "", fmt.Errorf("%w: bad page token", ErrInvalidArgument)
		}
	}
	page, next, err := b.store.ListLeases(ctx, f)
	for i := range page {
		page[i].State = page[i].State.Public()
	}
	return page, next, err
}

// Roles returns the configured roles, sorted by name.
func (b *Broker) Roles() []Role {
	roles := b.live.Load().roles
	out := make([]Role, 0, len(roles))
	for _, r := range roles {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// later is the later of two instants.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
