package broker_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// samplingDB is the env's faultDB with the engine's session sampling.
type samplingDB struct{ *faultDB }

func (d samplingDB) SampleSessions(ctx context.Context) ([]broker.Session, error) {
	return d.faultDB.Database.(broker.ActivitySampler).SampleSessions(ctx)
}

// withSampling samples the target on demand only (no loop), with
// revoke_unused_after on the read-only role.
func withSampling(unusedAfter time.Duration) func(*broker.Config) {
	return func(cfg *broker.Config) {
		cfg.Databases["main"] = samplingDB{cfg.Databases["main"].(*faultDB)}
		cfg.ActivityInterval = -1
		for i := range cfg.Roles {
			if cfg.Roles[i].Name == roleRO {
				cfg.Roles[i].RevokeUnusedAfter = unusedAfter
			}
		}
	}
}

// connect opens a session with an issued credential and application_name
// app; the session is closed at the end of the test unless closed before.
func (e *env) connect(c broker.Credential, app string) *pgx.Conn {
	e.t.Helper()
	cfg, err := pgx.ParseConfig(e.target.URL(c.Username, c.Password))
	if err != nil {
		e.t.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = app
	conn, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		e.t.Fatalf("connect as %s: %v", c.Username, err)
	}
	e.t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// superExec runs statements as the server's superuser.
func (e *env) superExec(sql string, args ...any) {
	e.t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.target.SuperURL)
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

// disconnect closes c and waits until its backend has exited (it exits
// after the client's Terminate message, asynchronously):
// pg_terminate_backend with a timeout returns once the process is gone.
func (e *env) disconnect(c *pgx.Conn) {
	e.t.Helper()
	var pid int32
	if err := c.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		e.t.Fatal(err)
	}
	if err := c.Close(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	e.superExec("SELECT pg_terminate_backend($1, 10000)", pid)
}

func (e *env) sample() broker.ActivityReport {
	e.t.Helper()
	rep, err := e.b.SampleActivity(context.Background())
	if err != nil {
		e.t.Fatalf("SampleActivity: %v", err)
	}
	return rep
}

// auditRecords reads the audit log's records of one event.
func (e *env) auditRecords(event string) []audit.Record {
	e.t.Helper()
	data, err := os.ReadFile(e.auditPath)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []audit.Record
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		var r audit.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			e.t.Fatal(err)
		}
		if r.Event == event {
			out = append(out, r)
		}
	}
	return out
}

func assertUsage(t *testing.T, what string, got, want broker.LeaseUsage) {
	t.Helper()
	if got.Sessions != want.Sessions || got.PeakSessions != want.PeakSessions || got.SessionsSeen != want.SessionsSeen ||
		!got.FirstSeen.Equal(want.FirstSeen) || !got.LastSeen.Equal(want.LastSeen) ||
		got.ApplicationName != want.ApplicationName || got.ClientAddr != want.ClientAddr {
		t.Errorf("%s: usage\n got %+v\nwant %+v", what, got, want)
	}
}

// TestActivityRecordsUsagePerLease: sessions opened with an issued
// credential show on its lease after a sample (sessions now, peak,
// distinct sessions, first and last seen, application_name), and closing
// them brings sessions to 0 while the rest stays. A sample that finds
// nothing new writes nothing.
func TestActivityRecordsUsagePerLease(t *testing.T) {
	e := newEnv(t, withSampling(0))
	l, c := e.issue(roleRO, time.Hour)
	idle, _ := e.issue(roleUpdater, time.Hour)

	rep := e.sample()
	if rep.Written != 0 || rep.Targets["main"] != nil {
		t.Errorf("first sample with no session: %+v, want nothing written", rep)
	}
	if got := rep.Roles[roleRO]; got != (broker.RoleActivity{Leases: 1, NeverUsed: 1}) {
		t.Errorf("read_only activity %+v", got)
	}

	t1 := e.clock.Now().UTC()
	api := e.connect(c, "billing-api")
	rep = e.sample()
	want := broker.LeaseUsage{Sessions: 1, PeakSessions: 1, SessionsSeen: 1, FirstSeen: t1, LastSeen: t1, ApplicationName: "billing-api"}
	assertUsage(t, "one session", e.lease(l.ID).Usage, want)
	if rep.Written != 1 {
		t.Errorf("written %d, want 1", rep.Written)
	}
	if got := rep.Roles[roleRO]; got != (broker.RoleActivity{Leases: 1, Sessions: 1}) {
		t.Errorf("read_only activity %+v, want 1 lease, 1 session, used", got)
	}
	if got := rep.Roles[roleUpdater]; got != (broker.RoleActivity{Leases: 1, NeverUsed: 1}) {
		t.Errorf("updater activity %+v", got)
	}
	if u := e.lease(idle.ID).Usage; u != (broker.LeaseUsage{}) {
		t.Errorf("the lease never connected has usage %+v", u)
	}
	if recs := e.auditRecords(broker.AuditFirstUse); len(recs) != 1 || recs[0].LeaseID != l.ID || recs[0].Usage.ApplicationName != "billing-api" {
		t.Errorf("first_use records %+v, want one for %s", recs, l.ID)
	}

	e.clock.Advance(30 * time.Second)
	t2 := e.clock.Now().UTC()
	worker := e.connect(c, "billing-worker")
	e.sample()
	want = broker.LeaseUsage{Sessions: 2, PeakSessions: 2, SessionsSeen: 2, FirstSeen: t1, LastSeen: t2, ApplicationName: "billing-worker"}
	assertUsage(t, "two sessions", e.lease(l.ID).Usage, want)

	// Through the broker's own read, as Lookup and List show it.
	got, err := e.b.Lookup(context.Background(), l.ID)
	if err != nil {
		t.Fatal(err)
	}
	assertUsage(t, "Lookup", got.Usage, want)

	e.clock.Advance(30 * time.Second)
	e.disconnect(api)
	e.disconnect(worker)
	e.sample()
	want.Sessions = 0
	assertUsage(t, "closed", e.lease(l.ID).Usage, want)

	// Nothing changed: nothing is written, the revision stays.
	rev := e.lease(l.ID).Revision
	e.clock.Advance(30 * time.Second)
	if rep := e.sample(); rep.Written != 0 {
		t.Errorf("a sample with nothing new wrote %d leases", rep.Written)
	}
	if r := e.lease(l.ID).Revision; r != rev {
		t.Errorf("revision %d -> %d without a change", rev, r)
	}

	// A new session is a third distinct one; a restart forgets which
	// sessions were open, and counts none twice.
	e.clock.Advance(30 * time.Second)
	t5 := e.clock.Now().UTC()
	again := e.connect(c, "billing-cron")
	e.sample()
	want = broker.LeaseUsage{Sessions: 1, PeakSessions: 2, SessionsSeen: 3, FirstSeen: t1, LastSeen: t5, ApplicationName: "billing-cron"}
	assertUsage(t, "third session", e.lease(l.ID).Usage, want)
	e.restart()
	e.clock.Advance(30 * time.Second)
	e.sample()
	want.LastSeen = e.clock.Now().UTC()
	assertUsage(t, "after a restart", e.lease(l.ID).Usage, want)

	// Revoking ends the sessions, and the tombstone keeps the usage with
	// 0 sessions; the audit record carries it.
	if _, err := e.b.Revoke(context.Background(), l.ID); err != nil {
		t.Fatal(err)
	}
	_ = again
	want.Sessions = 0
	assertUsage(t, "revoked", e.lease(l.ID).Usage, want)
	recs := e.auditRecords(broker.AuditRevoke)
	if len(recs) != 1 || recs[0].Reason != broker.ReasonRevoked || recs[0].Usage == nil || recs[0].Usage.SessionsSeen != 3 || recs[0].Usage.PeakSessions != 2 {
		t.Errorf("revoke records %+v, want one with reason revoked and the usage", recs)
	}
}

// TestActivityShowsClientAddressWithReadAllStats: with pg_read_all_stats
// the broker also records the client address and the last query's start.
func TestActivityShowsClientAddressWithReadAllStats(t *testing.T) {
	e := newEnv(t, withSampling(0))
	e.superExec("GRANT pg_read_all_stats TO " + pgx.Identifier{e.target.AdminUser}.Sanitize())
	l, c := e.issue(roleRO, time.Hour)
	conn := e.connect(c, "reporting")
	before := time.Now().Add(-time.Minute)
	if _, err := conn.Exec(context.Background(), "SELECT count(*) FROM "+pgtest.DemoTable); err != nil {
		t.Fatal(err)
	}
	e.sample()
	u := e.lease(l.ID).Usage
	if u.ClientAddr != "127.0.0.1" && u.ClientAddr != "::1" {
		t.Errorf("client address %q, want loopback", u.ClientAddr)
	}
	if u.LastQueryStart.Before(before) || u.LastQueryStart.After(time.Now().Add(time.Minute)) {
		t.Errorf("last query start %v, want about now", u.LastQueryStart)
	}
	if u.ApplicationName != "reporting" || u.Sessions != 1 {
		t.Errorf("usage %+v", u)
	}
}

// TestRevokeUnusedAfter: a lease never connected is revoked once
// revoke_unused_after has passed since its issue, audited with reason
// unused; one connected all along is spared, and one that disconnected
// goes that long after it was last seen. A role without the setting keeps
// its unused leases.
func TestRevokeUnusedAfter(t *testing.T) {
	e := newEnv(t, withSampling(10*time.Minute))
	ctx := context.Background()
	never, _ := e.issue(roleRO, time.Hour)
	kept, keptCred := e.issue(roleRO, time.Hour)
	later, laterCred := e.issue(roleRO, time.Hour)
	other, _ := e.issue(roleUpdater, time.Hour) // no revoke_unused_after

	e.connect(keptCred, "always-on")
	e.sample()
	e.clock.Advance(6 * time.Minute)
	brief := e.connect(laterCred, "cron")
	if rep := e.sample(); rep.Revoked != 0 {
		t.Fatalf("revoked %d leases at 6 minutes", rep.Revoked)
	}
	e.disconnect(brief)
	lastSeen := e.clock.Now()

	e.clock.Advance(4 * time.Minute) // 10 minutes since the issue
	rep := e.sample()
	if rep.Revoked != 1 {
		t.Errorf("revoked %d leases at 10 minutes, want 1", rep.Revoked)
	}
	if s := e.lease(never.ID).State; s != broker.StateRevoked {
		t.Errorf("never-connected lease is %s, want revoked", s)
	}
	var exists bool
	if err := e.engineQueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", never.Username).Scan(&exists); err != nil || exists {
		t.Errorf("the unused lease's user still exists (%v)", err)
	}
	for _, l := range []broker.Lease{kept, later, other} {
		if s := e.lease(l.ID).State; s != broker.StateActive {
			t.Errorf("lease %s is %s, want active", l.ID, s)
		}
	}
	recs := e.auditRecords(broker.AuditRevoke)
	if len(recs) != 1 || recs[0].LeaseID != never.ID || recs[0].Reason != broker.ReasonUnused || recs[0].Usage.Used() {
		t.Errorf("revoke records %+v, want one for %s with reason unused and no use", recs, never.ID)
	}

	// Ten minutes after the brief session the cron lease goes too.
	e.clock.Advance(lastSeen.Add(10*time.Minute).Sub(e.clock.Now()) - time.Second)
	if rep := e.sample(); rep.Revoked != 0 {
		t.Errorf("revoked %d a second before the cron lease's idle time was up", rep.Revoked)
	}
	e.clock.Advance(time.Second)
	if rep := e.sample(); rep.Revoked != 1 || e.lease(later.ID).State != broker.StateRevoked {
		t.Errorf("cron lease %s after 10 idle minutes (revoked %d)", e.lease(later.ID).State, rep.Revoked)
	}
	if s := e.lease(kept.ID).State; s != broker.StateActive {
		t.Errorf("the lease with an open session is %s", s)
	}
	if s := e.lease(other.ID).State; s != broker.StateActive {
		t.Errorf("the updater lease (no revoke_unused_after) is %s", s)
	}
}

// engineQueryRow queries the target as its superuser.
func (e *env) engineQueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	e.t.Helper()
	conn, err := pgx.Connect(ctx, e.target.SuperURL)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close(context.Background()) })
	return conn.QueryRow(ctx, sql, args...)
}
