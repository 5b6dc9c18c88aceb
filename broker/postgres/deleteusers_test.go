package postgres_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestDeleteUsers drops a batch of users, one with an open session, one
// that owns a table of its own, and one already gone, in one call: every
// result is success, no role is left, the session is ended, and the table
// now belongs to the proxy role.
func TestDeleteUsers(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "owner", Privileges: []string{"SELECT"}, CreateOnSchema: true},
	}})
	super := f.super(t)
	proxy := f.tg.ProxyRoles["owner"]

	var reqs []broker.DeleteUserRequest
	var sessionUser, sessionPassword string
	for i := range 5 {
		user, password := f.issue(t, "owner", hour())
		if i == 0 {
			sessionUser, sessionPassword = user, password
		}
		if i == 1 {
			// The user owns this table itself, not through the proxy
			// role: DROP ROLE needs REASSIGN OWNED first, for which the
			// admin needs the user's privileges (granted at the drop).
			c := f.mustLogin(t, user, password)
			if _, err := c.Exec(f.ctx, "SET ROLE NONE; CREATE TABLE owned_"+user+" (x int)"); err != nil {
				t.Fatal(err)
			}
			_ = c.Close(f.ctx)
		}
		reqs = append(reqs, broker.DeleteUserRequest{Username: user, ProxyRole: proxy})
	}
	ownedTable := "owned_" + reqs[1].Username
	reqs = append(reqs, broker.DeleteUserRequest{Username: randomName("u_gone_"), ProxyRole: proxy})
	conn := f.mustLogin(t, sessionUser, sessionPassword)

	errs := f.e.DeleteUsers(f.ctx, reqs)
	for i, err := range errs {
		if err != nil {
			t.Errorf("DeleteUsers: %s: %v", reqs[i].Username, err)
		}
	}
	for _, r := range reqs {
		if roleExists(t, f.ctx, super, r.Username) {
			t.Errorf("role %s still exists", r.Username)
		}
	}
	if err := conn.Ping(context.Background()); err == nil {
		t.Error("the user's session survived DeleteUsers")
	}
	if _, err := f.login(sessionUser, sessionPassword); err == nil {
		t.Error("login succeeded after DeleteUsers")
	}
	var owner string
	if err := super.QueryRow(f.ctx, "SELECT tableowner FROM pg_tables WHERE tablename = $1", ownedTable).Scan(&owner); err != nil {
		t.Fatalf("the table the user owned: %v", err)
	}
	if owner != proxy {
		t.Errorf("the table the user owned now belongs to %s, want the proxy role %s", owner, proxy)
	}
}

// TestDeleteUsersGuarded puts a role the broker did not make into a batch:
// the batch falls back to one user at a time, so that role is refused and
// left alone while the broker's own users are dropped.
func TestDeleteUsersGuarded(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)
	proxy := f.tg.ProxyRoles["read_only"]
	stranger := randomName("u_")
	if _, err := super.Exec(f.ctx, "CREATE ROLE "+stranger+" LOGIN IN ROLE "+proxy); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), pgtest.Server(t).SuperURL("postgres"))
		if err == nil {
			_, _ = c.Exec(context.Background(), "DROP ROLE IF EXISTS "+stranger)
			_ = c.Close(context.Background())
		}
	})
	a, _ := f.issue(t, "read_only", hour())
	b, _ := f.issue(t, "read_only", hour())
	reqs := []broker.DeleteUserRequest{
		{Username: a, ProxyRole: proxy}, {Username: stranger, ProxyRole: proxy}, {Username: b, ProxyRole: proxy},
	}
	errs := f.e.DeleteUsers(f.ctx, reqs)
	if errs[0] != nil || errs[2] != nil {
		t.Errorf("DeleteUsers of the broker's users: %v, %v", errs[0], errs[2])
	}
	if errs[1] == nil {
		t.Error("DeleteUsers of a role the broker did not make succeeded")
	}
	if !roleExists(t, f.ctx, super, stranger) {
		t.Error("the stranger role was dropped")
	}
	for _, u := range []string{a, b} {
		if roleExists(t, f.ctx, super, u) {
			t.Errorf("role %s still exists", u)
		}
	}
}
