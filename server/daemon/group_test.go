package daemon

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// Two brokerd with stores of their own on one cluster, as blue/green or
// staging beside production would run: the second finds the marker role
// owned by the first group and refuses to start, naming the role and the
// fix, without touching the first group's users or their sessions. The
// owner itself restarts fine on its own store (the same group).
func TestSecondBrokerGroupOnOneMarkerRoleRefusesToStart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	roles := [][2]string{{"read_only", tg.ProxyRoles["read_only"]}}
	blue := targetConfig(t, tg, tg.AdminPassword, roles, "")

	d1, err := Start(ctx, blue, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	lease, cred, err := d1.Broker().Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "blue-app"})
	if err != nil {
		t.Fatal(err)
	}
	session, err := pgx.Connect(ctx, tg.URL(cred.Username, cred.Password))
	if err != nil {
		t.Fatalf("logging in as the issued user: %v", err)
	}
	defer session.Close(ctx)

	green := targetConfig(t, tg, tg.AdminPassword, roles, "") // another store: another group
	d2, err := Start(ctx, green, testOptions())
	if err == nil {
		d2.Close() // its start-up sweep ran: what follows shows the damage
		t.Error("a second broker group started on a marker role the first owns")
	} else if !errors.Is(err, broker.ErrMarkerOwned) {
		t.Errorf("Start: %v, want ErrMarkerOwned", err)
	}
	for _, want := range []string{tg.MarkerRole, "targets[].marker_role"} {
		if err != nil && !strings.Contains(err.Error(), want) {
			t.Errorf("Start's error does not name %q: %v", want, err)
		}
	}

	// The first group's user and its open session are untouched.
	var one int
	if err := session.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		t.Fatalf("the first group's session was ended: %v", err)
	}
	assertRoleExists(ctx, t, tg, cred.Username, true)
	if _, err := d1.Broker().Reconcile(ctx); err != nil {
		t.Errorf("the owner's reconcile: %v", err)
	}
	assertRoleExists(ctx, t, tg, cred.Username, true)

	// The owner restarts on its store: same group, starts, keeps its lease.
	if err := d1.Close(); err != nil {
		t.Fatal(err)
	}
	d1, err = Start(ctx, blue, testOptions())
	if err != nil {
		t.Fatalf("the owning group restarting: %v", err)
	}
	defer d1.Close()
	if got, err := d1.Broker().Lookup(ctx, lease.ID); err != nil || got.State != broker.StateActive {
		t.Errorf("lease after the owner's restart: %+v, %v", got, err)
	}
	if err := session.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		t.Fatalf("the session ended across the owner's restart: %v", err)
	}
	assertRoleExists(ctx, t, tg, cred.Username, true)
}

func assertRoleExists(ctx context.Context, t *testing.T, tg *pgtest.Target, role string, want bool) {
	t.Helper()
	conn, err := pgx.Connect(ctx, tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var got bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", role).Scan(&got); err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("role %s exists: %t, want %t", role, got, want)
	}
}
