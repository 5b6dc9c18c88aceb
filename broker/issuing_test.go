package broker_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
)

// createRecorder notes, for each CreateLease, the lease's state and whether
// its user existed already.
type createRecorder struct {
	broker.LeaseStore
	db *fakedb.DB
	mu sync.Mutex
	// states and userFirst have one entry per CreateLease.
	states    []broker.LeaseState
	userFirst []bool
	promoted  int // leases written Active by UpdateLeases
}

func (r *createRecorder) CreateLease(ctx context.Context, l *broker.Lease) error {
	_, exists := r.db.User(l.Username)
	r.mu.Lock()
	r.states = append(r.states, l.State)
	r.userFirst = append(r.userFirst, exists)
	r.mu.Unlock()
	return r.LeaseStore.CreateLease(ctx, l)
}

func (r *createRecorder) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	r.mu.Lock()
	for _, l := range ls {
		if l.State == broker.StateActive {
			r.promoted++
		}
	}
	r.mu.Unlock()
	return r.LeaseStore.UpdateLeases(ctx, ls)
}

// TestUnitIssueWritesIssuingThenPromotes: the direct path writes the full
// lease as ISSUING before the user exists, returns it as ACTIVE, and the
// background promotion writes it ACTIVE afterwards.
func TestUnitIssueWritesIssuingThenPromotes(t *testing.T) {
	var rec *createRecorder
	u := newUnit(t, func(c *broker.Config) {
		rec = &createRecorder{LeaseStore: c.Store, db: c.Databases["main"].(*fakedb.DB)}
		c.Store = rec
	})
	ctx := context.Background()
	l, cred, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc", Metadata: map[string]string{"pod": "p1"}})
	if err != nil {
		t.Fatal(err)
	}
	if l.State != broker.StateActive {
		t.Errorf("Issue returned a lease %s, want it shown active", l.State)
	}
	rec.mu.Lock()
	states, userFirst := rec.states, rec.userFirst
	rec.mu.Unlock()
	if len(states) != 1 || states[0] != broker.StateIssuing || userFirst[0] {
		t.Fatalf("CreateLease calls: states %v, user existed before %v; want one ISSUING write before the user", states, userFirst)
	}
	if !u.userExists(cred.Username) {
		t.Error("the credential's user does not exist")
	}
	u.b.WaitPromotions()
	got := u.lease(l.ID)
	if got.State != broker.StateActive || got.Client != "svc" || got.Metadata["pod"] != "p1" || !got.ExpireTime.Equal(l.ExpireTime) {
		t.Errorf("stored after promotion: %+v", got)
	}
	rec.mu.Lock()
	promoted := rec.promoted
	rec.mu.Unlock()
	if promoted != 1 {
		t.Errorf("%d promotions written, want 1", promoted)
	}
}

// TestUnitFailedIssueLeavesNoLease: when CREATE ROLE fails, on the direct
// path and with a reservation, the user is dropped and neither its
// ISSUING lease nor an intent is left.
func TestUnitFailedIssueLeavesNoLease(t *testing.T) {
	for _, pooled := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "pooled"}[pooled], func(t *testing.T) {
			u := newUnit(t, func(c *broker.Config) {
				if pooled {
					c.IssuePool = 2
				}
			})
			ctx := context.Background()
			if pooled {
				u.issue(roleUpdater, 0, "svc") // fills the updater pool
				waitFor(t, "the pool to fill", func() bool {
					in, _ := u.store.ListIntents(ctx)
					return len(in) == 2
				})
			}
			drops := u.db.CallCount(fakedb.DeleteUser)
			u.db.FailNext(fakedb.NewUser, errors.New("injected"))
			if _, _, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleUpdater}); err == nil {
				t.Fatal("issue succeeded although CREATE ROLE failed")
			}
			if got := u.db.CallCount(fakedb.DeleteUser) - drops; got != 1 {
				t.Errorf("the failed issue's user was dropped %d times, want once", got)
			}
			leases, _, err := u.store.ListLeases(ctx, broker.LeaseFilter{State: broker.StateIssuing})
			if err != nil || len(leases) != 0 {
				t.Errorf("ISSUING leases left by a failed issue: %v (%v)", leases, err)
			}
			if pooled {
				// The failed one's intent is gone; the refill may have
				// added others, none of them in use.
				if err := u.b.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if in, _ := u.store.ListIntents(ctx); len(in) != 0 {
				t.Errorf("intents left: %v", in)
			}
		})
	}
}

// issuingLease stores an ISSUING lease for roleRO as a crashed issue left
// it, with or without its user.
func (u *unit) issuingLease(id string, withUser bool) broker.Lease {
	u.t.Helper()
	now := u.clock.Now()
	l := broker.Lease{ID: id, Role: roleRO, Client: "svc", Target: "main", Username: "cb_read_only_" + id[:12],
		ProxyRole: "read_only_role", IssueTime: now, ExpireTime: now.Add(15 * time.Minute),
		MaxExpireTime: now.Add(time.Hour), State: broker.StateIssuing}
	if err := u.store.CreateLease(context.Background(), &l); err != nil {
		u.t.Fatal(err)
	}
	if withUser {
		u.db.AddUser(fakedb.User{Name: l.Username, ProxyRole: l.ProxyRole, ValidUntil: l.ExpireTime})
	}
	return l
}

// TestUnitReconcileSettlesIssuingLeases: an ISSUING lease left by a crash
// whose user exists is promoted to ACTIVE (its caller may hold the
// credential); one whose user does not exist is removed; the user is
// not dropped as unknown.
func TestUnitReconcileSettlesIssuingLeases(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	kept := u.issuingLease("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", true)
	gone := u.issuingLease("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", false)
	res, err := u.b.Reconcile(ctx)
	if err != nil || res.IssuingPromoted != 1 || res.IssuingRemoved != 1 || res.UsersDropped != 0 || res.LeasesSettled != 0 {
		t.Fatalf("Reconcile = %+v, %v; want one promoted, one removed, nothing else", res, err)
	}
	if l := u.lease(kept.ID); l.State != broker.StateActive {
		t.Errorf("ISSUING lease with its user: %s, want active", l.State)
	}
	if !u.userExists(kept.Username) {
		t.Error("the user of the promoted lease was dropped")
	}
	if _, err := u.store.GetLease(ctx, gone.ID); !errors.Is(err, broker.ErrLeaseNotFound) {
		t.Errorf("ISSUING lease without a user: %v, want it removed", err)
	}
}

// TestUnitIssuingLeaseIsLive: an ISSUING lease (its promotion not written
// yet) is renewed, listed as active and revoked like an ACTIVE one.
func TestUnitIssuingLeaseIsLive(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	a := u.issuingLease("cccccccccccccccccccccccccccccccc", true)
	b := u.issuingLease("dddddddddddddddddddddddddddddddd", true)
	renewed, err := u.b.Renew(ctx, a.ID, 30*time.Minute)
	if err != nil || !renewed.ExpireTime.After(a.ExpireTime) {
		t.Fatalf("Renew of an ISSUING lease: %v, expire %v (was %v)", err, renewed.ExpireTime, a.ExpireTime)
	}
	if v, _ := u.db.User(a.Username); !v.ValidUntil.After(a.ExpireTime) {
		t.Errorf("VALID UNTIL not moved: %v", v.ValidUntil)
	}
	active, _, err := u.b.ListLeases(ctx, broker.LeaseFilter{State: broker.StateActive})
	if err != nil || len(active) != 2 {
		t.Errorf("ListLeases(active): %d leases (%v), want both ISSUING ones", len(active), err)
	}
	if l, err := u.b.Revoke(ctx, a.ID); err != nil || l.State != broker.StateRevoked || u.userExists(a.Username) {
		t.Errorf("Revoke of an ISSUING lease: %s, %v, user exists %v", l.State, err, u.userExists(a.Username))
	}
	if l, err := u.b.Lookup(ctx, b.ID); err != nil || l.State != broker.StateActive {
		t.Errorf("Lookup of an ISSUING lease: %s, %v; want it shown active", l.State, err)
	}
}

// lostCommitDB creates the user but reports an error, as when the
// connection drops after CREATE ROLE's COMMIT.
type lostCommitDB struct{ *fakedb.DB }

func (d lostCommitDB) NewUser(ctx context.Context, req broker.NewUserRequest) error {
	if err := d.DB.NewUser(ctx, req); err != nil {
		return err
	}
	return errors.New("injected: connection lost after COMMIT")
}

// TestUnitFailedIssueWhoseUserStaysLeavesNoLease: CREATE ROLE committed
// but reported an error, and the drop that undoes it fails too. The
// failed issue leaves no lease (an ISSUING lease with its user would be
// promoted, as if a caller held it), but an intent, whose user the
// reconciler drops.
func TestUnitFailedIssueWhoseUserStaysLeavesNoLease(t *testing.T) {
	u := newUnit(t, func(c *broker.Config) { c.Databases["main"] = lostCommitDB{c.Databases["main"].(*fakedb.DB)} })
	ctx := context.Background()
	for range 3 { // every try of abandonIssue's
		u.db.FailNext(fakedb.DeleteUser, errors.New("injected: drop failed"))
	}
	if _, _, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleRO}); err == nil {
		t.Fatal("issue succeeded although CREATE ROLE reported an error")
	}
	if leases, _, err := u.store.ListLeases(ctx, broker.LeaseFilter{}); err != nil || len(leases) != 0 {
		t.Errorf("leases left by the failed issue: %v (%v)", leases, err)
	}
	users := u.db.Usernames()
	intents, err := u.store.ListIntents(ctx)
	if err != nil || len(users) != 1 || len(intents) != 1 || intents[0].Username != users[0] {
		t.Fatalf("users %v, intents %+v (%v); want the undropped user named by an intent", users, intents, err)
	}
	res, err := u.b.Reconcile(ctx)
	if err != nil || res.IntentsSettled != 1 {
		t.Fatalf("Reconcile = %+v, %v; want the intent settled", res, err)
	}
	if users := u.db.Usernames(); len(users) != 0 {
		t.Errorf("users left after reconciliation: %v", users)
	}
}

// cancelOnGet is a store whose GetLease, once armed, cancels a context:
// a reconciliation whose caller gives up halfway.
type cancelOnGet struct {
	broker.LeaseStore
	cancel atomic.Pointer[context.CancelFunc]
}

func (s *cancelOnGet) GetLease(ctx context.Context, id string) (broker.Lease, error) {
	if c := s.cancel.Swap(nil); c != nil {
		(*c)()
	}
	return s.LeaseStore.GetLease(ctx, id)
}

// TestUnitReconcileStopsWhenItsContextEnds: a sweep whose context ends
// halfway stops, and says so once, instead of failing every lease left
// with the same error (a start-up reconciliation cut short logged
// hundreds of "context canceled").
func TestUnitReconcileStopsWhenItsContextEnds(t *testing.T) {
	var store *cancelOnGet
	u := newUnit(t, func(cfg *broker.Config) {
		store = &cancelOnGet{LeaseStore: cfg.Store}
		cfg.Store = store
	})
	for i := range 20 {
		u.issuingLease(strings.Repeat(string(rune('a'+i)), 32), false)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store.cancel.Store(&cancel)
	_, err := u.b.Reconcile(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Reconcile = %v, want context.Canceled", err)
	}
	if n := strings.Count(err.Error(), "context canceled"); n > 2 {
		t.Errorf("the error names the cancellation %d times:\n%s", n, err)
	}
}

// flakyIntents fails the first fails PutIntent calls and counts them all.
type flakyIntents struct {
	broker.LeaseStore
	fails, calls atomic.Int32
}

func (s *flakyIntents) PutIntent(ctx context.Context, in broker.Intent) error {
	s.calls.Add(1)
	if s.fails.Add(-1) >= 0 {
		return errors.New("injected: intent write failed")
	}
	return s.LeaseStore.PutIntent(ctx, in)
}

// TestUnitFailedIssueCleanupPausesBetweenTries: when the drop that undoes
// a failed issue fails, and then the hand-over's intent write, each next
// try comes only after a pause (on the broker's abandon timer, which the
// test holds), the pauses double from AbandonBasePause and stay under
// twice it, and the steps are tried three times each.
func TestUnitFailedIssueCleanupPausesBetweenTries(t *testing.T) {
	store := &flakyIntents{}
	u := newUnit(t, func(c *broker.Config) {
		c.Databases["main"] = lostCommitDB{c.Databases["main"].(*fakedb.DB)}
		store.LeaseStore = c.Store
		c.Store = store
	})
	for range 3 {
		u.db.FailNext(fakedb.DeleteUser, errors.New("injected: drop failed"))
	}
	store.fails.Store(2)
	asked := make(chan time.Duration)
	fire := make(chan time.Time)
	u.b.SetAbandonTimer(func(d time.Duration) <-chan time.Time {
		asked <- d
		return fire
	})
	done := make(chan error, 1)
	go func() {
		_, _, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO})
		done <- err
	}()
	tries := func() (drops, intents int) {
		return u.db.CallCount(fakedb.DeleteUser), int(store.calls.Load())
	}
	deadline := time.After(10 * time.Second)
	var total time.Duration
	for i, want := range []struct {
		drops, intents int
		pause          time.Duration // its upper bound; at least half of it
	}{
		{1, 0, broker.AbandonBasePause},
		{2, 0, 2 * broker.AbandonBasePause},
		{3, 1, broker.AbandonBasePause},
		{3, 2, 2 * broker.AbandonBasePause},
	} {
		select {
		case d := <-asked:
			if drops, intents := tries(); drops != want.drops || intents != want.intents {
				t.Fatalf("pause %d began after %d drops and %d intent writes, want %d and %d", i+1, drops, intents, want.drops, want.intents)
			}
			if d < want.pause/2 || d > want.pause {
				t.Errorf("pause %d is %v, want %v..%v", i+1, d, want.pause/2, want.pause)
			}
			total += d
			// Held: no try is made until the pause ends.
			select {
			case err := <-done:
				t.Fatalf("the issue returned (%v) during pause %d", err, i+1)
			default:
			}
			if drops, intents := tries(); drops != want.drops || intents != want.intents {
				t.Fatalf("during pause %d: %d drops and %d intent writes, want %d and %d", i+1, drops, intents, want.drops, want.intents)
			}
			fire <- time.Time{}
		case err := <-done:
			drops, intents := tries()
			t.Fatalf("the issue returned (%v) after %d drops and %d intent writes without pause %d", err, drops, intents, i+1)
		case <-deadline:
			t.Fatalf("timed out waiting for pause %d", i+1)
		}
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("issue succeeded although CREATE ROLE reported an error")
		}
	case d := <-asked:
		t.Fatalf("a fifth pause (%v): the steps are tried more than three times", d)
	case <-deadline:
		t.Fatal("timed out waiting for the failed issue to return")
	}
	if drops, intents := tries(); drops != 3 || intents != 3 {
		t.Errorf("%d drops and %d intent writes, want 3 of each", drops, intents)
	}
	if max := 6 * broker.AbandonBasePause; total > max {
		t.Errorf("pauses add up to %v, want at most %v", total, max)
	}
	// The third intent write succeeded: the user is handed over.
	if intents, err := u.store.ListIntents(context.Background()); err != nil || len(intents) != 1 {
		t.Errorf("intents %+v (%v), want the undropped user's", intents, err)
	}
}

type issueResult struct {
	l   broker.Lease
	err error
}

// issueUntilCreate starts an issue in the background and waits, with a
// deadline, until its CREATE ROLE has begun (started receives); the
// issue's result comes on the channel it returns.
func issueUntilCreate(t *testing.T, u *unit, started <-chan struct{}) <-chan issueResult {
	t.Helper()
	done := make(chan issueResult, 1)
	go func() {
		l, _, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, Client: "svc"})
		done <- issueResult{l, err}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the issue did not reach CREATE ROLE within 10s")
	}
	return done
}

// listRaceDB holds the first user creation until the test lets it go, and
// runs afterList (when set) between a listing of the managed users and
// its return: a CREATE ROLE that commits while a sweep is between its
// listing and its decisions.
type listRaceDB struct {
	broker.Database
	started   chan struct{} // receives once a creation is waiting
	create    chan struct{} // closed to let creations go on
	afterList atomic.Pointer[func()]
}

func (d *listRaceDB) NewUser(ctx context.Context, req broker.NewUserRequest) error {
	select {
	case d.started <- struct{}{}:
	default:
	}
	select {
	case <-d.create:
	case <-ctx.Done():
		return ctx.Err()
	}
	return d.Database.NewUser(ctx, req)
}

func (d *listRaceDB) ListManagedUsers(ctx context.Context) ([]string, error) {
	users, err := d.Database.ListManagedUsers(ctx)
	if f := d.afterList.Load(); f != nil {
		(*f)()
	}
	return users, err
}

// A sweep that scans the live leases while an issue is in flight (its
// lease is stored, Issuing, before its user is created), lists the users
// before the user is created, and decides after the issue returned, must
// leave the lease alone: the listing says nothing of that user. Before,
// the sweep took the user for gone and ended the lease of a credential
// its caller held (TestChaosLeasesSettleWithoutLossOrEarlyDrop found it:
// an issued lease missing from the store).
func TestUnitReconcileLeavesTheLeaseOfAnIssueInFlight(t *testing.T) {
	var db *listRaceDB
	u := newUnit(t, func(c *broker.Config) {
		db = &listRaceDB{Database: c.Databases["main"], started: make(chan struct{}, 1), create: make(chan struct{})}
		c.Databases["main"] = db
	})
	issued := issueUntilCreate(t, u, db.started)
	var got issueResult
	after := func() {
		close(db.create)
		select {
		case got = <-issued:
		case <-time.After(10 * time.Second):
			t.Error("the issue did not return within 10s of its user's creation")
		}
	}
	db.afterList.Store(&after)
	res, err := u.b.Reconcile(context.Background())
	db.afterList.Store(nil)
	if err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	if got.err != nil {
		t.Fatalf("Issue: %v", got.err)
	}
	if res.LeasesSettled != 0 || res.IssuingRemoved != 0 || res.UsersDropped != 0 {
		t.Errorf("the sweep acted on the issue in flight: %+v", res)
	}
	u.b.WaitPromotions()
	if l, err := u.store.GetLease(context.Background(), got.l.ID); err != nil || l.State != broker.StateActive {
		t.Errorf("the issued lease is %v (%v), want Active", l.State, err)
	}
	if !u.userExists(got.l.Username) {
		t.Error("the issued lease's user is gone")
	}
}

// blockingCreate is a database whose CREATE ROLE waits for its context.
type blockingCreate struct {
	broker.Database
	started chan struct{}
}

func (d *blockingCreate) NewUser(ctx context.Context, req broker.NewUserRequest) error {
	select {
	case d.started <- struct{}{}:
	default:
	}
	<-ctx.Done()
	return ctx.Err()
}

// In a group, the leader removes an Issuing lease whose user two sweeps
// ReconcileConfirm apart did not find, and an issue on another instance is
// not in its memory: a CREATE ROLE that took longer could commit after the
// removal and hand out a credential without a lease. So an issue gives
// CREATE ROLE half of ReconcileConfirm, then undoes itself and answers
// Unavailable.
func TestUnitIssueInAGroupBoundsCreateRole(t *testing.T) {
	const confirm = 30 * time.Second
	var db *blockingCreate
	u := newUnit(t, func(c *broker.Config) {
		c.ReconcileConfirm = confirm
		db = &blockingCreate{Database: c.Databases["main"], started: make(chan struct{}, 1)}
		c.Databases["main"] = db
	})
	done := issueUntilCreate(t, u, db.started)
	deadline := u.clock.Now().Add(confirm / 2)
	waitFor(t, "the issue to arm its CREATE ROLE bound", func() bool {
		return u.clock.WaitersUntil(deadline) > u.clock.WaitersUntil(deadline.Add(-time.Nanosecond))
	})
	u.clock.Advance(confirm / 2)
	var got issueResult
	select {
	case got = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the issue did not give up on CREATE ROLE at half of ReconcileConfirm")
	}
	if !errors.Is(got.err, broker.ErrUnavailable) || got.l.ID != "" {
		t.Fatalf("Issue = %+v, %v; want ErrUnavailable and no lease", got.l, got.err)
	}
	if !strings.Contains(got.err.Error(), "CREATE ROLE took longer than 15s") {
		t.Errorf("error %q does not say why", got.err)
	}
	leases, _, err := u.store.ListLeases(context.Background(), broker.LeaseFilter{})
	if err != nil || len(leases) != 0 {
		t.Errorf("leases after the undone issue: %+v, %v; want none", leases, err)
	}
}
