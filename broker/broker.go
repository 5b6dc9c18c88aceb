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

	queue   *ExpiryQueue
	leaseMu keyedMutex
	hub     eventHub
	// watchers are told of every lifecycle event, like the Auditor (audit.go).
	watchers lifecycleWatchers
	// renewals batches concurrent renewals per target (renewbatch.go).
	renewals renewBatcher
	// revocations batches concurrent requested revocations per target
	// (revokebatch.go).
	revocations revokeBatcher
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
		cfg:         cfg,
		store:       cfg.Store,
		dbs:         cfg.Databases,
		clock:       cfg.Clock,
		revocations: revokeBatcher{slots: revokeBatches},
		log:         cfg.Logger,
		queue:       NewExpiryQueue(),
		limiter:     rate.NewLimiter(rate.Limit(cfg.RevokeRate), cfg.RevokeConcurrency),
		streams:     make(map[string]*streamState),
		inflight:    make(map[string]struct{}),
		closed:      make(chan struct{}),
		storeFails:  make(map[string]int),
		lanes:       newRevokeLanes(cfg.Databases),
	}
	b.live.Store(live)
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

// Close stops the background loops and waits for them. It closes neither
// the store nor the databases.
func (b *Broker) Close() error {
	select {
	case <-b.closed:
		return nil
	default:
	}
	close(b.closed)
	b.stopPool()
	if b.cancel != nil {
		b.cancel()
	}
	b.wg.Wait()
	b.drainPool()
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
// Crash safety: the intent is stored before CREATE ROLE and the lease (which
// deletes the intent) after it, and the credential is returned only once the
// lease is stored. A crash in between leaves an intent, which the reconciler
// settles by dropping the user.
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
	group, _ := b.groupID(ctx) // read by ensureClaimed
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
		State:              StateActive,
		Metadata:           copyMetadata(req.Metadata),
		RevokeOnDisconnect: req.RevokeOnDisconnect,
	}
	var intent Intent
	var password, verifier string
	r, ok := b.takeReservation(role)
	if ok && (r.intent.Target != role.Target || r.intent.ProxyRole != role.ProxyRole) {
		// Made before a reload changed the role.
		b.release([]reservation{r})
		ok = false
	}
	if ok {
		// Ready ahead (issuepool.go): the intent is durable already and
		// the password hashed; the reservation is in flight.
		intent, password, verifier = r.intent, r.password, r.verifier
		lease.ID, lease.Username = intent.LeaseID, intent.Username
		defer b.setInflight(lease.ID, false)
	} else {
		password = NewPassword()
		intent = Intent{LeaseID: lease.ID, Target: lease.Target, Username: lease.Username, ProxyRole: lease.ProxyRole, CreateTime: now, Group: group}
		b.setInflight(lease.ID, true)
		defer b.setInflight(lease.ID, false)
		// Hash while the intent's commit waits on its fsync.
		hashed := make(chan string, 1)
		if h, ok := db.(PasswordHasher); ok {
			go func() {
				v, _ := h.HashPassword(password) // on error NewUser hashes, and reports it
				hashed <- v
			}()
		} else {
			hashed <- ""
		}
		err := b.store.PutIntent(ctx, intent)
		verifier = <-hashed
		if err != nil {
			return Lease{}, Credential{}, fmt.Errorf("record intent: %w", err)
		}
	}
	log := b.log.With("lease_id", lease.ID, "role", lease.Role, "client", lease.Client, "username", lease.Username)
	err = db.NewUser(ctx, NewUserRequest{
		Username:   lease.Username,
		Password:   password,
		ProxyRole:  lease.ProxyRole,
		ValidUntil: lease.ExpireTime.Add(b.conf().ValidUntilGrace),
		Verifier:   verifier,
	})
	if err != nil {
		// The CREATE may have committed even though we saw an error (the
		// connection can drop after COMMIT), so drop the user either way.
		b.abandonIssue(intent, log)
		return Lease{}, Credential{}, fmt.Errorf("create user: %w", err)
	}
	if err := b.store.CreateLease(ctx, &lease); err != nil && !b.createdAnyway(&lease, intent, err, log) {
		if errors.Is(err, ErrUnknownOutcome) {
			return Lease{}, Credential{}, fmt.Errorf("%w: store lease: %w", ErrUnavailable, err)
		}
		return Lease{}, Credential{}, fmt.Errorf("store lease: %w", err)
	}
	b.queue.Set(lease.ID, lease.ExpireTime)
	b.queue.SetTarget(lease.ID, lease.Target)
	if lease.RevokeOnDisconnect {
		b.armDisconnect(lease.ID, now.Add(b.conf().DisconnectGrace))
	}
	log.Info("lease issued", "expire_time", lease.ExpireTime)
	b.audit(AuditIssue, lease, "")
	ep := db.Endpoint()
	return lease.Clone(), Credential{
		Username: lease.Username,
		Password: password,
		Host:     ep.Host,
		Port:     ep.Port,
		Database: ep.Database,
	}, nil
}

// createdAnyway settles a CreateLease that returned err. The write may have
// committed all the same (ErrUnknownOutcome, a context that ended while it
// was in flight), and undoing the issue then would leave an ACTIVE lease
// without a user, and out of the expiry queue. So the lease is read back
// first: if it is stored, createdAnyway sets *l to it and reports true, and
// the issue goes on; if it is not, the issue is undone. If even the read
// fails, the user and the intent stay for the reconciler (it drops the
// user unless the lease exists), and the lease is queued so that, if it
// does exist, it is revoked at its expiry.
func (b *Broker) createdAnyway(l *Lease, in Intent, err error, log *slog.Logger) bool {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	stored, rerr := b.store.GetLease(ctx, l.ID)
	switch {
	case rerr == nil && stored.Username == l.Username:
		log.Warn("lease stored although the store reported an error; issuing it", "err", err)
		*l = stored
		return true
	case rerr == nil:
		// The id is another lease's (ErrExists): ours was not stored.
		b.abandonIssue(in, log)
		return false
	case errors.Is(rerr, ErrLeaseNotFound):
		if errors.Is(err, ErrUnknownOutcome) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			// Should the write still land, the expiry manager revokes it;
			// if it never does, the entry finds no lease and goes.
			b.queue.Set(l.ID, l.ExpireTime)
		}
		b.abandonIssue(in, log)
		return false
	default:
		b.queue.Set(l.ID, l.ExpireTime)
		log.Warn("could not tell whether the lease was stored; the reconciler settles it", "err", err, "read_err", rerr)
		return false
	}
}

// abandonIssue undoes a half-finished issue on a context of its own: the
// caller's may already be cancelled. If the drop fails the intent stays,
// and the reconciler finishes the job.
func (b *Broker) abandonIssue(in Intent, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	if err := b.settleIntent(ctx, in); err != nil {
		log.Warn("could not undo a failed issue; the reconciler will retry", "err", err)
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
		case l.State != StateActive:
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

// Lookup returns a lease.
func (b *Broker) Lookup(ctx context.Context, id string) (Lease, error) {
	if err := ValidateLeaseID(id); err != nil {
		return Lease{}, err
	}
	return b.store.GetLease(ctx, id)
}

// ListLeases lists leases matching f; see LeaseStore.ListLeases.
func (b *Broker) ListLeases(ctx context.Context, f LeaseFilter) ([]Lease, string, error) {
	if f.After != "" {
		if err := ValidateLeaseID(f.After); err != nil {
			return nil, "", fmt.Errorf("%w: bad page token", ErrInvalidArgument)
		}
	}
	return b.store.ListLeases(ctx, f)
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
