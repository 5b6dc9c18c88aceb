package postgres_test

import (
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// markerComment reads the marker role's comment as a superuser.
func markerComment(t *testing.T, f *fixture) string {
	t.Helper()
	conn, err := pgx.Connect(f.ctx, f.tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(f.ctx)
	var c string
	err = conn.QueryRow(f.ctx, `SELECT coalesce(shobj_description(oid, 'pg_authid'), '') FROM pg_roles WHERE rolname = $1`,
		f.tg.MarkerRole).Scan(&c)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func superExec(t *testing.T, f *fixture, sql string) {
	t.Helper()
	conn, err := pgx.Connect(f.ctx, f.tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(f.ctx)
	if _, err := conn.Exec(f.ctx, sql); err != nil {
		t.Fatal(err)
	}
}

// The marker role pgtest makes has no comment, as one made before claims
// existed: the first group claims it, and then no other group can.
func TestClaimMarkerRecordsTheOwningGroup(t *testing.T) {
	f := newFixture(t, pgtest.TargetOptions{})
	mine, other := broker.NewGroupID(), broker.NewGroupID()
	if err := f.e.ClaimMarker(f.ctx, mine); err != nil {
		t.Fatalf("claiming an unclaimed marker role: %v", err)
	}
	want := "credbroker group " + mine
	if got := markerComment(t, f); got != want {
		t.Fatalf("marker role comment = %q, want %q", got, want)
	}
	if err := f.e.ClaimMarker(f.ctx, mine); err != nil {
		t.Errorf("the owner claiming again (a restart): %v", err)
	}

	// Another group, through another engine as a second brokerd would.
	e2, err := postgres.New(f.ctx, f.tg.EngineConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	err = e2.ClaimMarker(f.ctx, other)
	if !errors.Is(err, broker.ErrMarkerOwned) {
		t.Fatalf("another group's claim = %v, want ErrMarkerOwned", err)
	}
	for _, s := range []string{f.tg.MarkerRole, "targets[].marker_role", mine} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %q", err, s)
		}
	}
	if got := markerComment(t, f); got != want {
		t.Errorf("after the refused claim the comment is %q, want %q", got, want)
	}
}

func TestClaimMarkerRefusesACommentThatIsNoClaim(t *testing.T) {
	f := newFixture(t, pgtest.TargetOptions{})
	superExec(t, f, "COMMENT ON ROLE "+postgres.QuoteIdentifier(f.tg.MarkerRole)+" IS 'users of the nightly ETL'")
	err := f.e.ClaimMarker(f.ctx, broker.NewGroupID())
	if !errors.Is(err, broker.ErrMarkerOwned) || !strings.Contains(err.Error(), "nightly ETL") {
		t.Fatalf("claim over a DBA's comment = %v, want ErrMarkerOwned quoting it", err)
	}
	if got := markerComment(t, f); got != "users of the nightly ETL" {
		t.Errorf("comment changed to %q", got)
	}
	// Cleared by an operator, the role can be claimed.
	superExec(t, f, "COMMENT ON ROLE "+postgres.QuoteIdentifier(f.tg.MarkerRole)+" IS NULL")
	if err := f.e.ClaimMarker(f.ctx, broker.NewGroupID()); err != nil {
		t.Errorf("claim after the comment was cleared: %v", err)
	}
}

// Of groups claiming one unclaimed marker role at once, exactly one wins.
func TestClaimMarkerConcurrentClaimsHaveOneWinner(t *testing.T) {
	f := newFixture(t, pgtest.TargetOptions{})
	const groups = 6
	errs := make([]error, groups)
	ids := make([]string, groups)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range groups {
		ids[i] = broker.NewGroupID()
		wg.Go(func() {
			<-start
			errs[i] = f.e.ClaimMarker(f.ctx, ids[i])
		})
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Errorf("groups %d and %d both claimed the marker role", winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, broker.ErrMarkerOwned):
			t.Errorf("group %d: %v, want success or ErrMarkerOwned", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no group claimed the marker role")
	}
	if got := markerComment(t, f); got != "credbroker group "+ids[winner] {
		t.Errorf("comment %q, but group %d (%s) won", got, winner, ids[winner])
	}
}
