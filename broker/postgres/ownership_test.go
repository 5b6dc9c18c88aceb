package postgres_test

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// ownershipFixture is a target whose proxy role may create tables, a
// second database of the same cluster where it may too, and one user per
// case of what a user can leave behind that DROP ROLE refuses to drop it
// over (pg_shdepend), plus one that leaves nothing.
type ownershipFixture struct {
	*fixture
	proxy   string
	su      *pgx.Conn
	otherDB string
	other   *pgx.Conn // superuser, on otherDB
	users   map[string]string
}

// The cases of ownershipFixture.users.
const (
	ownsNothing         = "owns nothing"
	ownsTableElsewhere  = "owns a table in a second database"
	grantedPrivilege    = "was granted a privilege on a table"
	grantedOnDatabase   = "was granted a privilege on a database (a shared object)"
	ownsDefaultPrivs    = "set default privileges for its own objects"
	grantedDefaultPrivs = "is named in another role's default privileges"
)

func newOwnershipFixture(t *testing.T) *ownershipFixture {
	t.Helper()
	f := &ownershipFixture{fixture: newFixture(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "owner", Privileges: []string{"SELECT"}, CreateOnSchema: true},
	}}), users: map[string]string{}}
	f.proxy = f.tg.ProxyRoles["owner"]
	f.su = f.super(t)
	f.otherDB = f.tg.Database + "_two"
	// Owned by the proxy role: privileges on it are then granted by the
	// proxy role, which the admin can revoke (it has its privileges). A
	// grant by a role the admin cannot act as, the bootstrap superuser
	// say, is beyond any non-superuser's DROP OWNED (PostgreSQL revokes
	// only what the current user, or an owner it is a member of, granted).
	if _, err := f.su.Exec(f.ctx, "CREATE DATABASE "+f.otherDB+" OWNER "+f.proxy); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), pgtest.Server(t).SuperURL("postgres"))
		if err == nil {
			_, _ = c.Exec(context.Background(), "DROP DATABASE IF EXISTS "+f.otherDB+" WITH (FORCE)")
			_ = c.Close(context.Background())
		}
	})
	var err error
	if f.other, err = pgx.Connect(f.ctx, pgtest.Server(t).SuperURL(f.otherDB)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.other.Close(context.Background()) })
	if _, err := f.other.Exec(f.ctx, "GRANT CREATE ON SCHEMA public TO "+f.proxy); err != nil {
		t.Fatal(err)
	}

	exec := func(c *pgx.Conn, sql string) {
		t.Helper()
		if _, err := c.Exec(f.ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	for _, c := range []string{ownsNothing, ownsTableElsewhere, grantedPrivilege, grantedOnDatabase, ownsDefaultPrivs, grantedDefaultPrivs} {
		user, password := f.issue(t, "owner", hour())
		f.users[c] = user
		switch c {
		case ownsNothing:
			// Logged in and created a table, as the proxy role (SET role):
			// the proxy owns it, the user nothing.
			conn := f.mustLogin(t, user, password)
			exec(conn, "CREATE TABLE by_proxy_"+user+" (x int)")
			_ = conn.Close(f.ctx)
		case ownsTableElsewhere:
			url := strings.Replace(f.tg.URL(user, password), "/"+f.tg.Database+"?", "/"+f.otherDB+"?", 1)
			conn, err := pgx.Connect(f.ctx, url)
			if err != nil {
				t.Fatal(err)
			}
			exec(conn, "SET ROLE NONE; CREATE TABLE elsewhere_"+user+" (x int)")
			_ = conn.Close(f.ctx)
		case grantedPrivilege:
			// On a table of the proxy role's (a grant by the superuser
			// acts as the owner: the grantor is the proxy role).
			table := "granted_" + user
			exec(f.su, "CREATE TABLE "+table+" (x int)")
			exec(f.su, "ALTER TABLE "+table+" OWNER TO "+f.proxy)
			exec(f.su, "GRANT SELECT ON "+table+" TO "+user)
		case grantedOnDatabase:
			exec(f.su, "GRANT CONNECT ON DATABASE "+f.otherDB+" TO "+user)
		case ownsDefaultPrivs:
			// Its own default privileges (pg_default_acl, owned by the
			// user): REASSIGN OWNED leaves them, DROP OWNED drops them.
			conn := f.mustLogin(t, user, password)
			exec(conn, "SET ROLE NONE; ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO "+f.proxy)
			_ = conn.Close(f.ctx)
		case grantedDefaultPrivs:
			exec(f.su, "ALTER DEFAULT PRIVILEGES FOR ROLE "+f.proxy+" GRANT SELECT ON TABLES TO "+user)
		}
	}
	return f
}

// dropWouldFail reports whether a bare DROP ROLE of user fails because
// something depends on it (tried in a transaction that is rolled back).
func (f *ownershipFixture) dropWouldFail(t *testing.T, user string) bool {
	t.Helper()
	tx, err := f.su.Begin(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(f.ctx) }()
	_, err = tx.Exec(f.ctx, "DROP ROLE "+user)
	return err != nil && strings.Contains(err.Error(), "2BP01")
}

// checkGone checks that every case's user is gone and what it owned is
// the proxy role's.
func (f *ownershipFixture) checkGone(t *testing.T) {
	t.Helper()
	for c, u := range f.users {
		if roleExists(t, f.ctx, f.su, u) {
			t.Errorf("user that %s still exists", c)
		}
	}
	var owner string
	table := "elsewhere_" + f.users[ownsTableElsewhere]
	if err := f.other.QueryRow(f.ctx, "SELECT tableowner FROM pg_tables WHERE tablename = $1", table).Scan(&owner); err != nil {
		t.Fatalf("the table in the second database: %v", err)
	}
	if owner != f.proxy {
		t.Errorf("the table in the second database belongs to %s, want the proxy role %s", owner, f.proxy)
	}
}

// TestOwnershipFromTheCatalog checks what DeleteUser reads in its second
// step to decide where REASSIGN/DROP OWNED must run, case by case, against
// what DROP ROLE itself refuses: a user that owns nothing needs neither
// anywhere, each other case needs them exactly where it left something.
func TestOwnershipFromTheCatalog(t *testing.T) {
	t.Parallel()
	f := newOwnershipFixture(t)
	users := make([]string, 0, len(f.users))
	for _, u := range f.users {
		users = append(users, u)
	}
	here, elsewhere, err := postgres.Ownership(f.ctx, f.e, users)
	if err != nil {
		t.Fatal(err)
	}
	for c, wantHere := range map[string]bool{
		ownsNothing:         false,
		ownsTableElsewhere:  false,
		grantedPrivilege:    true,
		grantedOnDatabase:   true,
		ownsDefaultPrivs:    true,
		grantedDefaultPrivs: true,
	} {
		u := f.users[c]
		if here[u] != wantHere {
			t.Errorf("user that %s: REASSIGN/DROP OWNED needed in its database %v, want %v", c, here[u], wantHere)
		}
		var want []string
		if c == ownsTableElsewhere {
			want = []string{f.otherDB}
		}
		if !slices.Equal(elsewhere[u], want) {
			t.Errorf("user that %s: other databases %v, want %v", c, elsewhere[u], want)
		}
		if got := f.dropWouldFail(t, u); got != (c != ownsNothing) {
			t.Errorf("user that %s: bare DROP ROLE fails %v, want %v (the case does not test what it says)", c, got, c != ownsNothing)
		}
	}
}

// TestDeleteUserEachOwnershipCase drops each case's user with DeleteUser.
func TestDeleteUserEachOwnershipCase(t *testing.T) {
	t.Parallel()
	f := newOwnershipFixture(t)
	for c, u := range f.users {
		if err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: u, ProxyRole: f.proxy}); err != nil {
			t.Errorf("DeleteUser of the user that %s: %v", c, err)
		}
	}
	f.checkGone(t)
}

// TestDeleteUsersEachOwnershipCase drops every case's user in one
// DeleteUsers batch.
func TestDeleteUsersEachOwnershipCase(t *testing.T) {
	t.Parallel()
	f := newOwnershipFixture(t)
	var reqs []broker.DeleteUserRequest
	for _, u := range f.users {
		reqs = append(reqs, broker.DeleteUserRequest{Username: u, ProxyRole: f.proxy})
	}
	for i, err := range f.e.DeleteUsers(f.ctx, reqs) {
		if err != nil {
			t.Errorf("DeleteUsers: %s: %v", reqs[i].Username, err)
		}
	}
	f.checkGone(t)
}

// TestDeleteUserWhenTheCatalogMissedSomething makes the engine read the
// catalog as if no user owned anything, so it skips REASSIGN/DROP OWNED
// and DROP ROLE refuses ("some objects depend on it"): DeleteUser and
// DeleteUsers must fall back to the full sequence and still drop every
// user.
func TestDeleteUserWhenTheCatalogMissedSomething(t *testing.T) {
	t.Parallel()
	f := newOwnershipFixture(t)
	postgres.HideOwnership(f.e)
	single := []string{grantedPrivilege, ownsDefaultPrivs}
	for _, c := range single {
		if err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: f.users[c], ProxyRole: f.proxy}); err != nil {
			t.Errorf("DeleteUser of the user that %s: %v", c, err)
		}
		if roleExists(t, f.ctx, f.su, f.users[c]) {
			t.Errorf("user that %s still exists", c)
		}
	}
	var reqs []broker.DeleteUserRequest
	for c, u := range f.users {
		if c != ownsTableElsewhere && !slices.Contains(single, c) {
			reqs = append(reqs, broker.DeleteUserRequest{Username: u, ProxyRole: f.proxy})
		}
	}
	for i, err := range f.e.DeleteUsers(f.ctx, reqs) {
		if err != nil {
			t.Errorf("DeleteUsers: %s: %v", reqs[i].Username, err)
		}
	}
	for _, r := range reqs {
		if roleExists(t, f.ctx, f.su, r.Username) {
			t.Errorf("user %s still exists", r.Username)
		}
	}
}
