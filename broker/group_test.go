package broker_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
)

// claimingDB is fakedb with a marker role whose claim answers claimErr
// (nil: this group owns it), as postgres.Engine's would.
type claimingDB struct {
	*fakedb.DB
	mu       sync.Mutex
	claimErr error
	claims   int
}

func (d *claimingDB) ClaimMarker(_ context.Context, group string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.claims++
	if group == "" {
		return errors.New("claim without a group id")
	}
	return d.claimErr
}

func (d *claimingDB) set(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.claimErr = err
}

func withDB(db broker.Database) func(*broker.Config) {
	return func(c *broker.Config) { c.Databases = map[string]broker.Database{"main": db} }
}

// A marker role another group owns: the broker refuses to start and drops
// none of that group's users (its start-up sweep would have).
func TestUnitStartRefusesAMarkerRoleAnotherGroupOwns(t *testing.T) {
	db := &claimingDB{DB: fakedb.New(), claimErr: broker.ErrMarkerOwned}
	u := newUnstarted(t, withDB(db))
	db.AddUser(fakedb.User{Name: "cb_other_groups_user"})
	err := u.b.Start(context.Background())
	if !errors.Is(err, broker.ErrMarkerOwned) {
		t.Fatalf("Start = %v, want ErrMarkerOwned", err)
	}
	if got := db.Usernames(); !slices.Equal(got, []string{"cb_other_groups_user"}) {
		t.Errorf("users after the refused start: %v", got)
	}
}

// A target whose claim fails for lack of a connection is neither issued
// into nor swept until it is claimed; the first issue after it is back
// claims it.
func TestUnitUnreachableTargetIsClaimedWhenBack(t *testing.T) {
	db := &claimingDB{DB: fakedb.New(), claimErr: broker.ErrUnavailable}
	u := newUnstarted(t, withDB(db))
	db.AddUser(fakedb.User{Name: "cb_unknown"})
	if err := u.b.Start(context.Background()); err != nil {
		t.Fatalf("Start with a target down: %v", err)
	}
	if _, err := u.b.Reconcile(context.Background()); !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("Reconcile of an unclaimed target = %v, want ErrUnavailable", err)
	}
	if _, _, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, Client: "c"}); !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("Issue before the claim = %v, want ErrUnavailable", err)
	}
	if got := db.Usernames(); !slices.Equal(got, []string{"cb_unknown"}) {
		t.Errorf("users while unclaimed: %v (nothing may be swept or issued)", got)
	}
	db.set(nil)
	if _, _, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, Client: "c"}); err != nil {
		t.Fatalf("Issue once the claim succeeds: %v", err)
	}
}

// recordingStore records the intents written through it.
type recordingStore struct {
	broker.LeaseStore
	mu      sync.Mutex
	intents []broker.Intent
}

func (s *recordingStore) PutIntent(ctx context.Context, in broker.Intent) error {
	s.mu.Lock()
	s.intents = append(s.intents, in)
	s.mu.Unlock()
	return s.LeaseStore.PutIntent(ctx, in)
}

func TestUnitIntentsNameTheirGroup(t *testing.T) {
	var rec *recordingStore
	u := newUnit(t, func(c *broker.Config) {
		rec = &recordingStore{LeaseStore: c.Store}
		c.Store = rec
		c.IssuePool = 2
	})
	ctx := context.Background()
	// The direct path writes its Issuing lease first and no intent; the
	// issue starts the pool's refill, whose reservations are intents.
	if _, _, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "c"}); err != nil {
		t.Fatal(err)
	}
	group, err := u.store.GroupID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var intents []broker.Intent
	waitFor(t, "the pool's intents", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		intents = append(intents[:0], rec.intents...)
		return len(intents) > 0
	})
	for _, in := range intents {
		if in.Group != group {
			t.Errorf("intent written: %+v, want one of group %s", in, group)
		}
	}
}

// An intent another group wrote (a store copied into this group's place)
// names a user under that group's marker role: the reconciler neither
// settles it nor sweeps its user. Intents of this group, or of no group
// (written before groups), are settled as ever.
func TestUnitReconcileLeavesAnotherGroupsIntent(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	mine, err := u.store.GroupID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	intent := func(c byte, user, group string) broker.Intent {
		id := string(slices.Repeat([]byte{c}, 32))
		return broker.Intent{LeaseID: id, Target: "main", Username: user, ProxyRole: "read_only_role", CreateTime: unitT0, Group: group}
	}
	foreign := intent('a', "cb_foreign", broker.NewGroupID())
	for _, in := range []broker.Intent{foreign, intent('b', "cb_mine", mine), intent('c', "cb_old", "")} {
		u.db.AddUser(fakedb.User{Name: in.Username})
		mustPut(t, u.store, in)
	}
	res, err := u.b.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.IntentsSettled != 2 || res.UsersDropped != 0 {
		t.Errorf("reconcile = %+v, want 2 intents settled and no user swept", res)
	}
	if got := u.db.Usernames(); !slices.Equal(got, []string{"cb_foreign"}) {
		t.Errorf("users after reconcile: %v, want only the other group's", got)
	}
	if got, _ := u.store.ListIntents(ctx); len(got) != 1 || got[0].LeaseID != foreign.LeaseID {
		t.Errorf("intents after reconcile: %+v, want only the other group's", got)
	}
}

// The claim is checked again before every sweep: a marker role that
// another group took over while the broker ran (a DBA handed it over) is
// not swept, and issuing on it answers ErrMarkerOwned.
func TestUnitReconcileStopsSweepingAMarkerRoleTakenOver(t *testing.T) {
	db := &claimingDB{DB: fakedb.New()}
	u := newUnstarted(t, withDB(db))
	if err := u.b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	db.set(broker.ErrMarkerOwned)
	db.AddUser(fakedb.User{Name: "cb_new_owners_user"})
	if _, err := u.b.Reconcile(context.Background()); !errors.Is(err, broker.ErrMarkerOwned) {
		t.Errorf("Reconcile = %v, want ErrMarkerOwned", err)
	}
	if got := db.Usernames(); !slices.Equal(got, []string{"cb_new_owners_user"}) {
		t.Errorf("users after reconcile: %v, want the new owner's untouched", got)
	}
	if _, _, err := u.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, Client: "c"}); !errors.Is(err, broker.ErrMarkerOwned) {
		t.Errorf("Issue = %v, want ErrMarkerOwned", err)
	}
}
