package postgres_test

import (
	"errors"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestRenewUsersOneTransactionPerUserResults: the users of one batch are
// altered by one transaction (their pg_authid rows share an xmin), and a
// missing, foreign or invalid entry fails alone.
func TestRenewUsersOneTransactionPerUserResults(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)

	var users, passwords []string
	for range 3 {
		u, p := f.issue(t, "read_only", time.Now().Add(time.Minute))
		users, passwords = append(users, u), append(passwords, p)
	}
	future := time.Now().Add(3 * time.Hour).Truncate(time.Microsecond)
	adminBefore := super.QueryRow(f.ctx, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", f.tg.AdminUser)
	var adminVU *time.Time
	if err := adminBefore.Scan(&adminVU); err != nil {
		t.Fatal(err)
	}

	reqs := []broker.RenewUserRequest{
		{Username: users[0], ValidUntil: future},
		{Username: "u_no_such_user", ValidUntil: future},
		{Username: users[1], ValidUntil: future.Add(time.Second)},
		{Username: f.tg.AdminUser, ValidUntil: future},
		{Username: "bad name;", ValidUntil: future},
		{Username: users[2], ValidUntil: future.Add(2 * time.Second)},
	}
	errs := f.e.RenewUsers(f.ctx, reqs)
	if len(errs) != len(reqs) {
		t.Fatalf("RenewUsers returned %d errors for %d requests", len(errs), len(reqs))
	}
	for _, i := range []int{0, 2, 5} {
		if errs[i] != nil {
			t.Errorf("entry %d (%s): %v", i, reqs[i].Username, errs[i])
		}
		if got := validUntil(t, f, super, reqs[i].Username); !got.Equal(reqs[i].ValidUntil) {
			t.Errorf("rolvaliduntil of %s = %v, want %v", reqs[i].Username, got, reqs[i].ValidUntil)
		}
	}
	if !errors.Is(errs[1], postgres.ErrUserNotFound) {
		t.Errorf("missing user: %v, want ErrUserNotFound", errs[1])
	}
	if errs[3] == nil {
		t.Error("renewing the admin role succeeded")
	}
	if !errors.Is(errs[4], broker.ErrInvalidArgument) {
		t.Errorf("invalid name: %v, want ErrInvalidArgument", errs[4])
	}
	var adminAfter *time.Time
	if err := super.QueryRow(f.ctx, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", f.tg.AdminUser).Scan(&adminAfter); err != nil {
		t.Fatal(err)
	}
	if (adminAfter == nil) != (adminVU == nil) || (adminAfter != nil && !adminAfter.Equal(*adminVU)) {
		t.Errorf("the admin's rolvaliduntil changed from %v to %v", adminVU, adminAfter)
	}

	var xmins int
	if err := super.QueryRow(f.ctx, "SELECT count(DISTINCT xmin::text) FROM pg_authid WHERE rolname = ANY($1)", users).Scan(&xmins); err != nil {
		t.Fatal(err)
	}
	if xmins != 1 {
		t.Errorf("the renewed users were written by %d transactions, want 1", xmins)
	}
	for i := range users {
		conn := f.mustLogin(t, users[i], passwords[i])
		if err := conn.Ping(f.ctx); err != nil {
			t.Errorf("%s cannot use its session after renewal: %v", users[i], err)
		}
	}

	t.Run("all missing", func(t *testing.T) {
		errs := f.e.RenewUsers(f.ctx, []broker.RenewUserRequest{{Username: "u_gone_a", ValidUntil: future}, {Username: "u_gone_b", ValidUntil: future}})
		for i, err := range errs {
			if !errors.Is(err, postgres.ErrUserNotFound) {
				t.Errorf("entry %d: %v, want ErrUserNotFound", i, err)
			}
		}
	})
	t.Run("closed engine", func(t *testing.T) {
		g := newFixture(t, pgtest.TargetOptions{})
		g.e.Close()
		errs := g.e.RenewUsers(g.ctx, []broker.RenewUserRequest{{Username: users[0], ValidUntil: future}})
		if !errors.Is(errs[0], broker.ErrClosed) {
			t.Errorf("RenewUsers after Close: %v, want ErrClosed", errs[0])
		}
	})
}

// TestRenewUsersKnownUserDroppedByHand: users this engine created renew
// without the check; when one of them was dropped behind its back, the
// batch still gives each entry its true result.
func TestRenewUsersKnownUserDroppedByHand(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)
	var users []string
	for range 3 {
		u, _ := f.issue(t, "read_only", time.Now().Add(time.Minute))
		users = append(users, u)
	}
	future := time.Now().Add(3 * time.Hour).Truncate(time.Microsecond)
	batch := func() []broker.RenewUserRequest {
		var reqs []broker.RenewUserRequest
		for _, u := range users {
			reqs = append(reqs, broker.RenewUserRequest{Username: u, ValidUntil: future})
		}
		return reqs
	}
	for i, err := range f.e.RenewUsers(f.ctx, batch()) {
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
	}
	if _, err := super.Exec(f.ctx, "DROP ROLE "+postgres.QuoteIdentifier(users[1])); err != nil {
		t.Fatal(err)
	}
	future = future.Add(time.Hour)
	errs := f.e.RenewUsers(f.ctx, batch())
	for _, i := range []int{0, 2} {
		if errs[i] != nil {
			t.Errorf("entry %d: %v", i, errs[i])
		}
		if got := validUntil(t, f, super, users[i]); !got.Equal(future) {
			t.Errorf("rolvaliduntil of %s = %v, want %v", users[i], got, future)
		}
	}
	if !errors.Is(errs[1], postgres.ErrUserNotFound) {
		t.Errorf("the user dropped by hand: %v, want ErrUserNotFound", errs[1])
	}
}
