package postgres_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/internal/pgtest"
)

// connectAs opens a session as user with application_name app, closed at
// the end of the test.
func connectAs(t *testing.T, f *fixture, user, password, app string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(f.tg.URL(user, password))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = app
	conn, err := pgx.ConnectConfig(f.ctx, cfg)
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// TestSampleSessions: the engine lists the sessions of the users it made,
// and only theirs; as a non-superuser without pg_read_all_stats it sees
// user, pid and application_name, and with the grant also the client
// address, backend start and query start.
func TestSampleSessions(t *testing.T) {
	f := newFixture(t, pgtest.TargetOptions{})
	u1, p1 := f.issue(t, "read_only", time.Now().Add(time.Hour))
	u2, _ := f.issue(t, "read_only", time.Now().Add(time.Hour))
	c1 := connectAs(t, f, u1, p1, "billing-api")
	connectAs(t, f, u1, p1, "billing-worker")
	// The target's admin has sessions too (the engine's pool): not listed.

	got, err := f.e.SampleSessions(f.ctx)
	if err != nil {
		t.Fatalf("SampleSessions: %v", err)
	}
	if len(got) != 2 {
		t.Fatalf("SampleSessions = %+v, want the two sessions of %s", got, u1)
	}
	apps := []string{got[0].ApplicationName, got[1].ApplicationName}
	slices.Sort(apps)
	if !slices.Equal(apps, []string{"billing-api", "billing-worker"}) {
		t.Errorf("application names %q", apps)
	}
	var pid uint32
	if err := c1.QueryRow(f.ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range got {
		if s.Username != u1 {
			t.Errorf("session of %q listed, want only %s (not %s)", s.Username, u1, u2)
		}
		if s.PID == int32(pid) {
			found = true
		}
		if s.ClientAddr != "" || !s.BackendStart.IsZero() || !s.QueryStart.IsZero() {
			t.Errorf("without pg_read_all_stats the engine saw %+v; PostgreSQL hides these fields", s)
		}
	}
	if !found {
		t.Errorf("pid %d of the first session not among %+v", pid, got)
	}

	// With pg_read_all_stats the details appear.
	super, err := pgx.Connect(f.ctx, f.tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer super.Close(context.Background())
	if _, err := super.Exec(f.ctx, "GRANT pg_read_all_stats TO "+pgx.Identifier{f.tg.AdminUser}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	before := time.Now().Add(-time.Minute)
	got, err = f.e.SampleSessions(f.ctx)
	if err != nil || len(got) != 2 {
		t.Fatalf("SampleSessions with pg_read_all_stats = %+v, %v", got, err)
	}
	for _, s := range got {
		if s.ClientAddr != "127.0.0.1" && s.ClientAddr != "::1" {
			t.Errorf("client address %q, want loopback", s.ClientAddr)
		}
		if s.BackendStart.Before(before) {
			t.Errorf("backend start %v: want it in the last minute", s.BackendStart)
		}
		// Only the first session ran a query (SELECT pg_backend_pid()).
		if ran := s.PID == int32(pid); ran == s.QueryStart.IsZero() || ran && s.QueryStart.Before(before) {
			t.Errorf("session %d (first: %t): query start %v", s.PID, ran, s.QueryStart)
		}
	}

	// A closed session is gone.
	closeAndWait(t, f.ctx, super, c1)
	left, err := f.e.SampleSessions(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 1 || left[0].ApplicationName != "billing-worker" {
		t.Errorf("after closing one session: %+v, want only billing-worker", left)
	}
}

// closeAndWait closes c and waits until its backend has exited (a closed
// connection's backend exits right after the client's Terminate message,
// asynchronously): pg_terminate_backend with a timeout waits for the
// process to be gone, and only warns when it is gone already.
func closeAndWait(t *testing.T, ctx context.Context, super, c *pgx.Conn) {
	t.Helper()
	var pid uint32
	if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := super.Exec(ctx, "SELECT pg_terminate_backend($1, 10000)", int32(pid)); err != nil {
		t.Fatalf("waiting for backend %d to exit: %v", pid, err)
	}
}
