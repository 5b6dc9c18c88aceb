package postgres_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestGrantsByVersion pins what docs/postgres-grants.md says: before
// PostgreSQL 16, CREATEROLE plus plain membership in the proxy and marker
// roles is enough for the whole lifecycle (issue, revoke with an open
// session, drop of a user that owns a table); from 16 on, the engine
// refuses to start without ADMIN OPTION and names the GRANT that fixes it.
func TestGrantsByVersion(t *testing.T) {
	t.Parallel()
	srv := pgtest.Server(t)
	tg := srv.NewTarget(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "owner", Privileges: []string{"SELECT"}, CreateOnSchema: true},
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	f := &fixture{tg: tg, ctx: ctx}
	super := f.super(t)
	q := postgres.QuoteIdentifier
	admin, proxy := q(tg.AdminUser), q(tg.ProxyRoles["owner"])
	for _, sql := range []string{
		"REVOKE ADMIN OPTION FOR " + proxy + " FROM " + admin,
		"REVOKE ADMIN OPTION FOR " + q(tg.MarkerRole) + " FROM " + admin,
		"REVOKE pg_signal_backend FROM " + admin,
	} {
		if _, err := super.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	e, err := postgres.New(ctx, tg.EngineConfig())
	if srv.Version >= 16 {
		if err == nil {
			e.Close()
			t.Fatalf("PostgreSQL %d: New succeeded without ADMIN OPTION on the marker role", srv.Version)
		}
		if want := "GRANT " + q(tg.MarkerRole) + " TO " + admin + " WITH ADMIN OPTION"; !strings.Contains(err.Error(), want) {
			t.Errorf("PostgreSQL %d: error %q does not name the fix %q", srv.Version, err, want)
		}
		return
	}
	if err != nil {
		t.Fatalf("PostgreSQL %d: New with the pre-16 minimal grants: %v", srv.Version, err)
	}
	defer e.Close()
	f.e = e
	user, password := f.issue(t, "owner", hour())
	conn := f.mustLogin(t, user, password)
	if _, err := conn.Exec(ctx, "SET ROLE NONE; CREATE TABLE owned_by_user (x int)"); err != nil {
		t.Fatal(err)
	}
	if err := e.DeleteUser(ctx, broker.DeleteUserRequest{Username: user, ProxyRole: tg.ProxyRoles["owner"]}); err != nil {
		t.Fatalf("PostgreSQL %d: DeleteUser with the pre-16 minimal grants: %v", srv.Version, err)
	}
	if roleExists(t, ctx, super, user) {
		t.Fatal("the user still exists")
	}
	if err := conn.Ping(ctx); err == nil {
		t.Error("the user's session survived DeleteUser")
	}
	var owner string
	if err := super.QueryRow(ctx, "SELECT tableowner FROM pg_tables WHERE tablename = 'owned_by_user'").Scan(&owner); err != nil || owner != tg.ProxyRoles["owner"] {
		t.Errorf("the user's table is owned by %q (%v), want the proxy role", owner, err)
	}
}
