package broker_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/fakedb"
)

// gatedDeletes is the fake database with its first DeleteUser held until
// released, so that revocations pile up behind it.
type gatedDeletes struct {
	*fakedb.DB
	once    sync.Once
	entered chan struct{}
	gate    chan struct{}
}

func (g *gatedDeletes) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	g.once.Do(func() {
		close(g.entered)
		<-g.gate
	})
	return g.DB.DeleteUser(ctx, req)
}

func newRevokeUnit(t *testing.T) (*unit, *gatedDeletes) {
	t.Helper()
	g := &gatedDeletes{entered: make(chan struct{}), gate: make(chan struct{})}
	u := newUnit(t, func(c *broker.Config) {
		g.DB = c.Databases["main"].(*fakedb.DB)
		c.Databases["main"] = g
	})
	// One batch at a time: everything queues behind the held one.
	u.b.SetRevokeBatches(1)
	return u, g
}

type revokeOutcome struct {
	lease broker.Lease
	err   error
}

func revokeAsync(b *broker.Broker, id string) <-chan revokeOutcome {
	done := make(chan revokeOutcome, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		l, err := b.Revoke(ctx, id)
		done <- revokeOutcome{l, err}
	}()
	return done
}

func waitRevoke(t *testing.T, done <-chan revokeOutcome) revokeOutcome {
	t.Helper()
	select {
	case r := <-done:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("a revocation never answered")
		return revokeOutcome{}
	}
}

// TestUnitRevocationsArrivingTogetherAreBatched holds one revocation in the
// database while others arrive: those are then dropped by one DeleteUsers
// call, each caller gets its lease back REVOKED, and each lease is stored
// so; a user the database refuses to drop fails alone, on the single-lease
// path, which records the attempt.
func TestUnitRevocationsArrivingTogetherAreBatched(t *testing.T) {
	u, g := newRevokeUnit(t)
	first, _ := u.issue(roleRO, 0, "c")
	const n = 6
	var ids []string
	var refused string
	for i := range n {
		l, c := u.issue(roleRO, 0, "c")
		ids = append(ids, l.ID)
		if i == 2 {
			refused = c.Username
		}
	}
	u.db.FailUser(refused, errors.New("fakedb: refused"))

	firstDone := revokeAsync(u.b, first.ID)
	<-g.entered // alone, on an idle broker: the single path
	var dones []<-chan revokeOutcome
	for _, id := range ids {
		dones = append(dones, revokeAsync(u.b, id))
	}
	waitFor(t, "the revocations to queue behind the first", func() bool { return u.b.PendingRevocations() == n })
	close(g.gate)
	if r := waitRevoke(t, firstDone); r.err != nil || r.lease.State != broker.StateRevoked {
		t.Fatalf("first revocation: %v, state %v", r.err, r.lease.State)
	}
	for i, d := range dones {
		r := waitRevoke(t, d)
		stored := u.lease(ids[i])
		if i == 2 {
			if r.err == nil {
				t.Errorf("revocation of the refused user succeeded")
			}
			if stored.State.Terminal() || stored.RevokeAttempts != 1 || stored.LastError == "" {
				t.Errorf("refused user's lease: state %v, attempts %d, last error %q; want live, 1 attempt recorded",
					stored.State, stored.RevokeAttempts, stored.LastError)
			}
			continue
		}
		if r.err != nil || r.lease.State != broker.StateRevoked || r.lease.ID != ids[i] {
			t.Errorf("revocation %d: %v, lease %s state %v", i, r.err, r.lease.ID, r.lease.State)
		}
		if stored.State != broker.StateRevoked || stored.EndTime.IsZero() {
			t.Errorf("stored lease %d: state %v, end %v", i, stored.State, stored.EndTime)
		}
		if u.userExists(r.lease.Username) {
			t.Errorf("user of lease %d still exists", i)
		}
	}

	var batches [][]string
	for _, c := range u.db.Calls() {
		if c.Method == fakedb.DeleteUsers {
			batches = append(batches, c.Users)
		}
	}
	if len(batches) != 1 || len(batches[0]) != n {
		t.Fatalf("DeleteUsers calls %v, want one naming the %d queued users", batches, n)
	}
	if !slices.Contains(batches[0], refused) {
		t.Errorf("the refused user was not in the batch")
	}
}

// TestUnitLoneRevocationTakesTheSinglePath: on an idle broker a
// revocation is not batched, and the same lease revoked again answers
// unchanged.
func TestUnitLoneRevocationTakesTheSinglePath(t *testing.T) {
	u, g := newRevokeUnit(t)
	close(g.gate)
	l, c := u.issue(roleRO, 0, "c")
	r := waitRevoke(t, revokeAsync(u.b, l.ID))
	if r.err != nil || r.lease.State != broker.StateRevoked || u.userExists(c.Username) {
		t.Fatalf("Revoke: %v, state %v, user exists %v", r.err, r.lease.State, u.userExists(c.Username))
	}
	again := waitRevoke(t, revokeAsync(u.b, l.ID))
	if again.err != nil || again.lease.Revision != r.lease.Revision {
		t.Errorf("second Revoke: %v, revision %d, want unchanged %d", again.err, again.lease.Revision, r.lease.Revision)
	}
	if n := u.db.CallCount(fakedb.DeleteUsers); n != 0 {
		t.Errorf("%d DeleteUsers calls for a lone revocation", n)
	}
	if n := u.db.CallCount(fakedb.DeleteUser); n != 1 {
		t.Errorf("%d DeleteUser calls, want 1", n)
	}
}

// TestUnitRevokeLeasesInBatches: RevokeLeases of a role's leases drops
// them with DeleteUsers batches, and counts what it revoked.
func TestUnitRevokeLeasesInBatches(t *testing.T) {
	u, g := newRevokeUnit(t)
	close(g.gate)
	const n = 12
	for range n {
		u.issue(roleRO, 0, "c")
	}
	other, _ := u.issue(roleUpdater, 0, "c")
	got, err := u.b.RevokeLeases(context.Background(), broker.RevokeSelector{Role: roleRO})
	if err != nil || got != n {
		t.Fatalf("RevokeLeases = %d, %v; want %d", got, err, n)
	}
	if n := u.db.CallCount(fakedb.DeleteUser); n != 0 {
		t.Errorf("%d single DeleteUser calls, want none", n)
	}
	if calls := u.db.CallCount(fakedb.DeleteUsers); calls == 0 || calls > 4 {
		t.Errorf("%d DeleteUsers calls, want 1 to RevokeConcurrency (4)", calls)
	}
	if s := u.lease(other.ID).State; s != broker.StateActive {
		t.Errorf("another role's lease is %v", s)
	}
}

// gatedEngine is the real engine with its first DeleteUser held until
// released; it records the size of every DeleteUsers call.
type gatedEngine struct {
	broker.Database
	deleter broker.UsersDeleter // the engine itself
	mu      sync.Mutex
	sizes   []int
	once    sync.Once
	entered chan struct{}
	gate    chan struct{}
}

func (g *gatedEngine) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	g.once.Do(func() {
		close(g.entered)
		<-g.gate
	})
	return g.Database.DeleteUser(ctx, req)
}

func (g *gatedEngine) DeleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	g.mu.Lock()
	g.sizes = append(g.sizes, len(reqs))
	g.mu.Unlock()
	return g.deleter.DeleteUsers(ctx, reqs)
}

// TestRevocationsBatchedOnPostgres revokes, in one batch on a real
// PostgreSQL, a lease whose user has an open session, one whose user owns
// a table, one whose user set default privileges, and one whose user owns
// nothing: every one ends REVOKED, the session is ended, the table goes
// to the proxy role, and no user is left.
func TestRevocationsBatchedOnPostgres(t *testing.T) {
	g := &gatedEngine{entered: make(chan struct{}), gate: make(chan struct{})}
	e := newEnv(t, func(c *broker.Config) {
		g.Database = c.Databases["main"]
		g.deleter = c.Databases["main"].(*faultDB).Database.(broker.UsersDeleter)
		c.Databases["main"] = g
	})
	e.b.SetRevokeBatches(1)
	first, _ := e.issue(roleUpdater, 0)
	var leases []broker.Lease
	var creds []broker.Credential
	for range 4 {
		l, c := e.issue(roleUpdater, 0)
		leases, creds = append(leases, l), append(creds, c)
	}
	session, err := e.login(creds[0])
	if err != nil {
		t.Fatal(err)
	}
	table := "owned_" + creds[1].Username
	for i, sql := range map[int]string{
		1: "SET ROLE NONE; CREATE TABLE " + table + " (x int)",
		2: "SET ROLE NONE; ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO " + e.target.ProxyRoles[roleUpdater],
	} {
		c, err := e.login(creds[i])
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(context.Background(), sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		_ = c.Close(context.Background())
	}

	firstDone := revokeAsync(e.b, first.ID)
	<-g.entered
	var dones []<-chan revokeOutcome
	for _, l := range leases {
		dones = append(dones, revokeAsync(e.b, l.ID))
	}
	waitFor(t, "the revocations to queue behind the first", func() bool { return e.b.PendingRevocations() == len(leases) })
	close(g.gate)
	if r := waitRevoke(t, firstDone); r.err != nil {
		t.Fatalf("first revocation: %v", r.err)
	}
	for i, d := range dones {
		if r := waitRevoke(t, d); r.err != nil || r.lease.State != broker.StateRevoked {
			t.Errorf("revocation %d: %v, state %v", i, r.err, r.lease.State)
		}
		if e.roleExists(creds[i].Username) {
			t.Errorf("user %d still exists", i)
		}
	}
	if err := session.Ping(context.Background()); err == nil {
		t.Error("the open session survived its revocation")
	}
	if owner := e.tableOwner(table); owner != e.target.ProxyRoles[roleUpdater] {
		t.Errorf("the user's table belongs to %q, want the proxy role", owner)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if !slices.Equal(g.sizes, []int{len(leases)}) {
		t.Errorf("DeleteUsers batch sizes %v, want [%d]", g.sizes, len(leases))
	}
}

// TestUnitRevocationLinger: after a batch of three, the batch goroutine
// waits for three revocations again rather than running the first that
// arrives on its own; once its timer expires it runs what it has.
func TestUnitRevocationLinger(t *testing.T) {
	u, g := newRevokeUnit(t)
	expire := make(chan time.Time)
	u.b.SetRevokeLingerTimer(func(time.Duration) <-chan time.Time { return expire })
	var ids []string
	for range 8 {
		l, _ := u.issue(roleRO, 0, "c")
		ids = append(ids, l.ID)
	}
	firstDone := revokeAsync(u.b, ids[0])
	<-g.entered // alone, held
	var dones []<-chan revokeOutcome
	for _, id := range ids[1:4] {
		dones = append(dones, revokeAsync(u.b, id))
	}
	waitFor(t, "three revocations queued", func() bool { return u.b.PendingRevocations() == 3 })
	close(g.gate)
	for _, d := range append(dones, firstDone) {
		if r := waitRevoke(t, d); r.err != nil {
			t.Fatal(r.err)
		}
	}
	// The batch of three is done; three more arrive one by one.
	var more []<-chan revokeOutcome
	for i, id := range ids[4:7] {
		more = append(more, revokeAsync(u.b, id))
		if i < 2 {
			waitFor(t, "the revocation to wait for more", func() bool { return u.b.PendingRevocations() == i+1 })
		}
	}
	for _, d := range more {
		if r := waitRevoke(t, d); r.err != nil {
			t.Fatal(r.err)
		}
	}
	// One more, alone: it waits until the linger's timer expires.
	last := revokeAsync(u.b, ids[7])
	waitFor(t, "the last revocation pending", func() bool { return u.b.PendingRevocations() == 1 })
	close(expire)
	if r := waitRevoke(t, last); r.err != nil || r.lease.State != broker.StateRevoked {
		t.Fatalf("last revocation: %v, state %v", r.err, r.lease.State)
	}
	var sizes []int
	for _, c := range u.db.Calls() {
		if c.Method == fakedb.DeleteUsers || c.Method == fakedb.DeleteUser {
			sizes = append(sizes, len(c.Users))
		}
	}
	if want := []int{1, 3, 3, 1}; !slices.Equal(sizes, want) {
		t.Errorf("users per DeleteUser(s) call %v, want %v", sizes, want)
	}
}
