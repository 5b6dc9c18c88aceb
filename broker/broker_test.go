package broker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/fakeclock"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/store"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// env is one broker over a real store file and a real PostgreSQL target,
// with fault-injecting wrappers around both and a manual clock.
type env struct {
	t         *testing.T
	target    *pgtest.Target
	engine    *postgres.Engine
	storePath string
	store     *store.Store
	sw        *crashSwitch
	db        *faultDB
	clock     *fakeclock.Clock
	b         *broker.Broker
	logs      *syncBuffer
	auditPath string
	audit     *audit.Log
	mods      []func(*broker.Config)
}

type syncBuffer = syncbuf.Buffer

const (
	roleRO      = "read_only"
	roleUpdater = "updater"
)

func newEnv(t *testing.T, mods ...func(*broker.Config)) *env {
	t.Helper()
	return newEnvAt(t, filepath.Join(t.TempDir(), "leases.db"), mods...)
}

// newEnvAt is newEnv with the store file at storePath.
func newEnvAt(t *testing.T, storePath string, mods ...func(*broker.Config)) *env {
	t.Helper()
	srv := pgtest.Server(t)
	target := srv.NewTarget(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "read_only", Privileges: []string{"SELECT"}},
		{Name: "updater", Privileges: []string{"SELECT", "INSERT", "UPDATE"}, CreateOnSchema: true},
	}})
	ctx := context.Background()
	engine, err := postgres.New(ctx, postgres.Config{URL: target.AdminURL, Password: target.AdminPassword, MarkerRole: target.MarkerRole})
	if err != nil {
		t.Fatalf("postgres.New: %v", err)
	}
	t.Cleanup(engine.Close)
	e := &env{
		t:         t,
		target:    target,
		engine:    engine,
		storePath: storePath,
		auditPath: filepath.Join(t.TempDir(), "audit.log"),
		// The manual clock starts at the real time: VALID UNTIL is checked
		// by PostgreSQL against its own clock.
		clock: fakeclock.New(time.Now().Truncate(time.Second)),
		logs:  &syncBuffer{},
		mods:  mods,
	}
	e.open()
	t.Cleanup(e.close)
	return e
}

// open starts a broker over the store file, as a process start would.
func (e *env) open() {
	e.t.Helper()
	st, err := store.Open(e.storePath, store.Options{Timeout: 5 * time.Second})
	if err != nil {
		e.t.Fatalf("store.Open: %v", err)
	}
	e.store = st
	if e.audit, err = audit.Open(e.auditPath, audit.Options{}); err != nil {
		e.t.Fatalf("audit.Open: %v", err)
	}
	e.sw = &crashSwitch{}
	e.db = &faultDB{Database: e.engine, sw: e.sw}
	cfg := broker.Config{
		Store:     faultStore{LeaseStore: st, sw: e.sw},
		Databases: map[string]broker.Database{"main": e.db},
		Roles: []broker.Role{
			{Name: roleRO, Target: "main", ProxyRole: e.target.ProxyRoles["read_only"], DefaultTTL: 15 * time.Minute, MaxTTL: time.Hour},
			{Name: roleUpdater, Target: "main", ProxyRole: e.target.ProxyRoles["updater"], DefaultTTL: 15 * time.Minute, MaxTTL: time.Hour},
		},
		Clock:          e.clock,
		Auditor:        e.audit,
		Logger:         slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		RetryBaseDelay: time.Second,
		RetryMaxDelay:  8 * time.Second,
		RevokeRetries:  3,
	}
	for _, m := range e.mods {
		m(&cfg)
	}
	b, err := broker.New(cfg)
	if err != nil {
		e.t.Fatalf("broker.New: %v", err)
	}
	if err := b.Start(context.Background()); err != nil {
		e.t.Fatalf("Start: %v", err)
	}
	e.b = b
}

// close stops the broker and the store, as a process exit would.
// reconcileCloseAndCheckIntents runs the reconciler once (what a store
// fault left, intents whose deletion was refused, is its to settle),
// closes the broker (the issue pool's reservations go then) and fails the
// test if the store still holds an intent. prefix starts each message.
func (e *env) reconcileCloseAndCheckIntents(t *testing.T, prefix string) {
	t.Helper()
	ctx := context.Background()
	if _, err := e.b.Reconcile(ctx); err != nil {
		t.Errorf("%sreconcile: %v", prefix, err)
	}
	e.close()
	st, err := store.Open(e.storePath, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if in, err := st.ListIntents(ctx); err != nil || len(in) != 0 {
		t.Errorf("%s%d intents left (%v): %+v", prefix, len(in), err, in)
	}
}

func (e *env) close() {
	if e.b != nil {
		_ = e.b.Close()
		e.b = nil
	}
	if e.store != nil {
		_ = e.store.Close()
		e.store = nil
	}
	if e.audit != nil {
		_ = e.audit.Close()
		e.audit = nil
	}
}

func (e *env) restart() {
	e.t.Helper()
	e.close()
	e.open()
}

func (e *env) issue(role string, ttl time.Duration) (broker.Lease, broker.Credential) {
	e.t.Helper()
	l, c, err := e.b.Issue(context.Background(), broker.IssueRequest{Role: role, TTL: ttl, Client: "test"})
	if err != nil {
		e.t.Fatalf("Issue(%s, %v): %v", role, ttl, err)
	}
	// Tests that read the stored lease find it Active.
	e.b.WaitPromotions()
	return l, c
}

// lease reads a lease straight from the store.
func (e *env) lease(id string) broker.Lease {
	e.t.Helper()
	l, err := e.store.GetLease(context.Background(), id)
	if err != nil {
		e.t.Fatalf("GetLease(%s): %v", id, err)
	}
	return l
}

// waitState waits, with a deadline, until the lease is in state want.
func (e *env) waitState(id string, want broker.LeaseState) broker.Lease {
	e.t.Helper()
	var l broker.Lease
	waitFor(e.t, fmt.Sprintf("lease %s to be %s", id, want), func() bool {
		l = e.lease(id)
		return l.State == want
	})
	return l
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (e *env) connURL(c broker.Credential) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(c.Username, c.Password),
		Host:     fmt.Sprintf("%s:%d", c.Host, c.Port),
		Path:     "/" + c.Database,
		RawQuery: "sslmode=disable&connect_timeout=5",
	}
	return u.String()
}

func (e *env) login(c broker.Credential) (*pgx.Conn, error) {
	conn, err := pgx.Connect(context.Background(), e.connURL(c))
	if err == nil {
		e.t.Cleanup(func() { _ = conn.Close(context.Background()) })
	}
	return conn, err
}

// superQueryRow runs one query as superuser on the target database and
// scans its single row into dest; it reports false when there is no row.
func (e *env) superQueryRow(sql string, args []any, dest ...any) bool {
	e.t.Helper()
	conn, err := pgx.Connect(context.Background(), e.target.SuperURL)
	if err != nil {
		e.t.Fatalf("superuser connect: %v", err)
	}
	defer conn.Close(context.Background())
	err = conn.QueryRow(context.Background(), sql, args...).Scan(dest...)
	if errors.Is(err, pgx.ErrNoRows) {
		return false
	}
	if err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
	return true
}

// roleExists asks PostgreSQL whether the user exists.
func (e *env) roleExists(name string) bool {
	e.t.Helper()
	var n int
	e.superQueryRow("SELECT count(*) FROM pg_roles WHERE rolname = $1", []any{name}, &n)
	return n == 1
}

func (e *env) validUntil(name string) time.Time {
	e.t.Helper()
	var v time.Time
	if !e.superQueryRow("SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", []any{name}, &v) {
		e.t.Fatalf("no role %s", name)
	}
	return v
}

func (e *env) tableOwner(table string) string {
	e.t.Helper()
	var owner string
	e.superQueryRow("SELECT tableowner FROM pg_tables WHERE tablename = $1", []any{table}, &owner)
	return owner
}

func (e *env) sessions(user string) int {
	e.t.Helper()
	var n int
	e.superQueryRow("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", []any{user}, &n)
	return n
}

// assertNoOrphans checks the crash-safety invariant: every member of the
// marker role has a live lease in the store.
func (e *env) assertNoOrphans() {
	e.t.Helper()
	users, err := e.engine.ListManagedUsers(context.Background())
	if err != nil {
		e.t.Fatalf("ListManagedUsers: %v", err)
	}
	leases, _, err := e.store.ListLeases(context.Background(), broker.LeaseFilter{})
	if err != nil {
		e.t.Fatalf("ListLeases: %v", err)
	}
	live := map[string]bool{}
	for _, l := range leases {
		if l.State.Live() {
			live[l.Username] = true
		}
	}
	for _, u := range users {
		if !live[u] {
			e.t.Errorf("orphan: PostgreSQL user %s has no live lease", u)
		}
	}
}

func TestIssueGivesWorkingReadOnlyCredential(t *testing.T) {
	e := newEnv(t)
	l, c := e.issue(roleRO, 0)
	if l.State != broker.StateActive || l.Role != roleRO || l.Client != "test" {
		t.Fatalf("lease = %+v", l)
	}
	if got := l.ExpireTime.Sub(l.IssueTime); got != 15*time.Minute {
		t.Errorf("ttl 0 gave %v, want the role default 15m", got)
	}
	if got := l.MaxExpireTime.Sub(l.IssueTime); got != time.Hour {
		t.Errorf("max ttl = %v, want 1h", got)
	}
	if len(c.Username) > 63 || !strings.HasPrefix(c.Username, "cb_read_only_") {
		t.Errorf("username %q: want cb_read_only_ prefix, <= 63 bytes", c.Username)
	}
	if len(c.Password) < 22 {
		t.Errorf("password is %d characters; want >= 128 bits", len(c.Password))
	}
	conn, err := e.login(c)
	if err != nil {
		t.Fatalf("login with issued credential: %v", err)
	}
	var cur string
	if err := conn.QueryRow(context.Background(), "SELECT current_user").Scan(&cur); err != nil {
		t.Fatal(err)
	}
	if cur != e.target.ProxyRoles["read_only"] {
		t.Errorf("current_user = %q, want the proxy role %q", cur, e.target.ProxyRoles["read_only"])
	}
	if _, err := conn.Exec(context.Background(), "SELECT * FROM "+pgtest.DemoTable); err != nil {
		t.Errorf("SELECT as read-only: %v", err)
	}
	_, err = conn.Exec(context.Background(), "INSERT INTO "+pgtest.DemoTable+" DEFAULT VALUES")
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("INSERT as read-only: err = %v, want permission denied", err)
	}
	// VALID UNTIL is the lease's expiry plus the grace (1m by default).
	if got, want := e.validUntil(c.Username), l.ExpireTime.Add(time.Minute); !got.Equal(want) {
		t.Errorf("VALID UNTIL = %v, want %v", got, want)
	}
}

func TestBadInputCreatesNothing(t *testing.T) {
	e := newEnv(t)
	bad := []string{"", "read_only'", "read_only; DROP ROLE x", "read\x00only", strings.Repeat("a", 200), "READ_ONLY", "pg_read", "ro--", "ro/*x*/"}
	for _, s := range bad {
		t.Run(fmt.Sprintf("role %q", s), func(t *testing.T) {
			_, _, err := e.b.Issue(context.Background(), broker.IssueRequest{Role: s})
			if !errors.Is(err, broker.ErrInvalidArgument) && !errors.Is(err, broker.ErrRoleNotFound) {
				t.Errorf("err = %v, want InvalidArgument or RoleNotFound", err)
			}
		})
		t.Run(fmt.Sprintf("lease id %q", s), func(t *testing.T) {
			for name, call := range map[string]func() error{
				"renew":  func() error { _, err := e.b.Renew(context.Background(), s, 0); return err },
				"revoke": func() error { _, err := e.b.Revoke(context.Background(), s); return err },
				"lookup": func() error { _, err := e.b.Lookup(context.Background(), s); return err },
				"revoke many": func() error {
					_, err := e.b.RevokeLeases(context.Background(), broker.RevokeSelector{IDs: []string{s}})
					return err
				},
			} {
				if err := call(); !errors.Is(err, broker.ErrInvalidArgument) {
					t.Errorf("%s: err = %v, want InvalidArgument", name, err)
				} else if strings.Contains(err.Error(), "\x00") {
					t.Errorf("%s: error echoes a NUL byte: %q", name, err)
				}
			}
		})
	}
	for name, md := range map[string]map[string]string{
		"quote key":        {"a'b": "x"},
		"semicolon key":    {"a;b": "x"},
		"NUL value":        {"k": "a\x00b"},
		"200-byte key":     {strings.Repeat("k", 200): "v"},
		"long value":       {"k": strings.Repeat("v", 600)},
		"newline value":    {"k": "a\nb"},
		"invalid utf8":     {"k": "\xff\xfe"},
		"too many entries": manyEntries(40),
	} {
		t.Run("metadata "+name, func(t *testing.T) {
			_, _, err := e.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, Metadata: md})
			if !errors.Is(err, broker.ErrInvalidArgument) {
				t.Errorf("err = %v, want InvalidArgument", err)
			}
		})
	}
	t.Run("unknown role", func(t *testing.T) {
		_, _, err := e.b.Issue(context.Background(), broker.IssueRequest{Role: "no_such_role"})
		if !errors.Is(err, broker.ErrRoleNotFound) {
			t.Errorf("err = %v, want ErrRoleNotFound", err)
		}
	})
	t.Run("unknown lease", func(t *testing.T) {
		_, err := e.b.Lookup(context.Background(), strings.Repeat("a", 32))
		if !errors.Is(err, broker.ErrLeaseNotFound) {
			t.Errorf("err = %v, want ErrLeaseNotFound", err)
		}
		_, err = e.b.Renew(context.Background(), strings.Repeat("a", 32), 0)
		if !errors.Is(err, broker.ErrLeaseNotFound) {
			t.Errorf("renew: err = %v, want ErrLeaseNotFound", err)
		}
	})
	t.Run("empty admin selector", func(t *testing.T) {
		_, err := e.b.RevokeLeases(context.Background(), broker.RevokeSelector{})
		if !errors.Is(err, broker.ErrInvalidArgument) {
			t.Errorf("err = %v, want InvalidArgument", err)
		}
	})
	users, err := e.engine.ListManagedUsers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	leases, _, _ := e.store.ListLeases(context.Background(), broker.LeaseFilter{})
	intents, _ := e.store.ListIntents(context.Background())
	if len(users) != 0 || len(leases) != 0 || len(intents) != 0 {
		t.Errorf("bad input left %d users, %d leases, %d intents; want none", len(users), len(leases), len(intents))
	}
}

func manyEntries(n int) map[string]string {
	m := map[string]string{}
	for i := range n {
		m[fmt.Sprintf("k%d", i)] = "v"
	}
	return m
}

func TestMetadataIsKept(t *testing.T) {
	e := newEnv(t)
	md := map[string]string{"service": "billing", "pod": "billing-7d9f", "note": "héllo, wörld; 'quoted'"}
	l, _, err := e.b.Issue(context.Background(), broker.IssueRequest{Role: roleRO, Metadata: md})
	if err != nil {
		t.Fatal(err)
	}
	got := e.lease(l.ID).Metadata
	for k, v := range md {
		if got[k] != v {
			t.Errorf("metadata[%s] = %q, want %q", k, got[k], v)
		}
	}
}

func TestRenew(t *testing.T) {
	e := newEnv(t)
	l, c := e.issue(roleRO, 10*time.Minute)
	e.clock.Advance(5 * time.Minute)

	r, err := e.b.Renew(context.Background(), l.ID, 20*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if want := e.clock.Now().Add(20 * time.Minute); !r.ExpireTime.Equal(want) {
		t.Errorf("expire = %v, want %v", r.ExpireTime, want)
	}
	if got, want := e.validUntil(c.Username), r.ExpireTime.Add(time.Minute); !got.Equal(want) {
		t.Errorf("VALID UNTIL = %v, want %v (moved with the renewal)", got, want)
	}
	if got := e.lease(l.ID).ExpireTime; !got.Equal(r.ExpireTime) {
		t.Errorf("stored expire = %v, want %v", got, r.ExpireTime)
	}

	// Zero increment: the role default (15m).
	r, err = e.b.Renew(context.Background(), l.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := e.clock.Now().Add(20 * time.Minute); !r.ExpireTime.Equal(want) {
		t.Errorf("renew 0 shortened the lease: expire = %v, want it kept at %v", r.ExpireTime, want)
	}

	// Never past the max.
	r, err = e.b.Renew(context.Background(), l.ID, 100000*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !r.ExpireTime.Equal(l.MaxExpireTime) {
		t.Errorf("expire = %v, want capped at max %v", r.ExpireTime, l.MaxExpireTime)
	}

	if _, err := e.b.Renew(context.Background(), l.ID, -time.Second); !errors.Is(err, broker.ErrInvalidArgument) {
		t.Errorf("negative increment: err = %v, want InvalidArgument", err)
	}
}

func TestRevokeEndsSessionsAndDropsUser(t *testing.T) {
	e := newEnv(t)
	l, c := e.issue(roleUpdater, 0)
	conn, err := e.login(c)
	if err != nil {
		t.Fatal(err)
	}
	// A user that created a table: with SET role = proxy it is owned by
	// the proxy role; after SET ROLE NONE the user owns it itself.
	if _, err := conn.Exec(context.Background(), "CREATE TABLE owned_by_proxy (x int)"); err != nil {
		t.Fatalf("create table as the proxy role: %v", err)
	}
	if _, err := conn.Exec(context.Background(), "SET ROLE NONE; CREATE TABLE owned_by_user (x int)"); err != nil {
		t.Fatalf("create table as the user itself: %v", err)
	}

	sleeping := make(chan error, 1)
	go func() {
		_, err := conn.Exec(context.Background(), "SELECT pg_sleep(30)")
		sleeping <- err
	}()
	waitFor(t, "the pg_sleep session to be active", func() bool {
		return e.sessions(c.Username) > 0
	})

	r, err := e.b.Revoke(context.Background(), l.ID)
	if err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	if r.State != broker.StateRevoked || r.EndTime.IsZero() {
		t.Errorf("revoked lease = state %s end %v", r.State, r.EndTime)
	}
	select {
	case err := <-sleeping:
		if err == nil {
			t.Error("pg_sleep(30) finished without error; its session should have been terminated")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the open session survived the revoke")
	}
	if e.roleExists(c.Username) {
		t.Error("user still exists after Revoke returned")
	}
	if owner := e.tableOwner("owned_by_user"); owner != e.target.ProxyRoles["updater"] {
		t.Errorf("the user's own table is owned by %q after revoke, want it reassigned to the proxy role", owner)
	}
	if _, err := e.login(c); err == nil {
		t.Error("login succeeded after revoke")
	}

	// Idempotent: a second revoke succeeds and changes nothing.
	again, err := e.b.Revoke(context.Background(), l.ID)
	if err != nil {
		t.Fatalf("second Revoke: %v", err)
	}
	if again.Revision != r.Revision || again.State != broker.StateRevoked {
		t.Errorf("second revoke changed the lease: %+v -> %+v", r, again)
	}
}

func TestExpiryRevokesAtExpireTime(t *testing.T) {
	e := newEnv(t)
	short, c := e.issue(roleRO, time.Minute)
	long, _ := e.issue(roleRO, 10*time.Minute)

	// One nanosecond early: nothing happens.
	e.clock.Advance(time.Minute - time.Nanosecond)
	if got := e.lease(short.ID).State; got != broker.StateActive {
		t.Fatalf("state before expiry = %s", got)
	}
	// At expire_time (broker time), the expiry manager revokes at once:
	// no further clock movement is needed, so the lag is zero, well within 1 s.
	e.clock.Advance(time.Nanosecond)
	l := e.waitState(short.ID, broker.StateExpired)
	if lag := l.EndTime.Sub(l.ExpireTime); lag < 0 || lag > time.Second {
		t.Errorf("revocation lag %v, want within 1s", lag)
	}
	if e.roleExists(c.Username) {
		t.Error("expired user still exists")
	}
	if _, err := e.login(c); err == nil {
		t.Error("login succeeded after expiry")
	}
	if got := e.lease(long.ID).State; got != broker.StateActive {
		t.Errorf("the 10m lease is %s after 1m", got)
	}
}

func TestRenewedLeaseIsNotExpiredEarly(t *testing.T) {
	e := newEnv(t)
	l, c := e.issue(roleRO, time.Minute)
	if _, err := e.b.Renew(context.Background(), l.ID, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(2 * time.Minute)
	// Give the dispatcher a chance to act wrongly: wait until it has
	// re-armed its timer for the renewed expiry.
	waitFor(t, "the dispatcher to wait on the clock", func() bool { return e.clock.Waiters() > 0 })
	if got := e.lease(l.ID).State; got != broker.StateActive {
		t.Errorf("renewed lease is %s at 2m of 10m", got)
	}
	if !e.roleExists(c.Username) {
		t.Error("renewed user was dropped")
	}
}

func TestRestartKeepsLeasesAndRevokesThoseExpiredMeanwhile(t *testing.T) {
	e := newEnv(t)
	short, cs := e.issue(roleRO, time.Minute)
	long, cl := e.issue(roleRO, 30*time.Minute)
	e.close()
	e.clock.Advance(5 * time.Minute) // the broker is down while short expires
	e.open()

	e.waitState(short.ID, broker.StateExpired)
	if e.roleExists(cs.Username) {
		t.Error("user of the lease that expired during the outage still exists")
	}
	got := e.lease(long.ID)
	if got.State != broker.StateActive || !got.ExpireTime.Equal(long.ExpireTime) {
		t.Errorf("long lease after restart: %+v", got)
	}
	if _, err := e.login(cl); err != nil {
		t.Errorf("login with the surviving lease: %v", err)
	}
	if _, err := e.b.Renew(context.Background(), long.ID, 0); err != nil {
		t.Errorf("renew after restart: %v", err)
	}
}

func TestReconcileDropsUnknownMarkerMembers(t *testing.T) {
	e := newEnv(t)
	keep, ck := e.issue(roleRO, 0)
	_, cx := e.issue(roleRO, 0)
	// Forget the second lease behind the broker's back: its user is now
	// unknown to the store, as after a lost store file.
	leases, _, _ := e.store.ListLeases(context.Background(), broker.LeaseFilter{})
	for _, l := range leases {
		if l.ID != keep.ID {
			if err := e.store.DeleteLease(context.Background(), l.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	res, err := e.b.Reconcile(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if res.UsersDropped != 1 {
		t.Errorf("dropped %d users, want 1", res.UsersDropped)
	}
	if e.roleExists(cx.Username) {
		t.Error("unknown user survived reconciliation")
	}
	if !e.roleExists(ck.Username) {
		t.Error("reconciliation dropped a leased user")
	}
}

// TestCrashAtEveryStepLeavesNoOrphan stops the broker dead between each
// pair of steps of issue and revoke (every later call to PostgreSQL and the
// store fails, as if the process had been killed), restarts it on the same
// store file, and checks that no PostgreSQL user is left without a live
// lease and that every credential a caller received has a lease.
func TestCrashAtEveryStepLeavesNoOrphan(t *testing.T) {
	// The direct path writes the Issuing lease, then creates the user;
	// with a reservation (its intent durable ahead) the lease's commit
	// and CREATE ROLE run at once. Either way the promotion to Active is
	// written after the credential is out ("UpdateLease:active").
	issueSteps := []string{
		"before CreateLease", "after CreateLease",
		"before NewUser", "after NewUser",
		"before UpdateLease:active", "after UpdateLease:active",
	}
	for _, pooled := range []bool{false, true} {
		for _, step := range issueSteps {
			t.Run(fmt.Sprintf("issue/pooled=%v/%s", pooled, step), func(t *testing.T) {
				pool := -1
				if pooled {
					pool = 1
				}
				e := newEnv(t, func(c *broker.Config) { c.IssuePool = pool })
				if pooled {
					e.issue(roleUpdater, 0) // starts the pool's refill
					waitFor(t, "a reservation", func() bool { return len(e.intentIDs()) == 1 })
				}
				e.sw.crashAt(step)
				l, c, err := e.b.Issue(context.Background(), broker.IssueRequest{Role: roleUpdater})
				e.b.WaitPromotions()
				if !e.sw.isTripped() {
					t.Fatalf("crash point %q never reached (issue error: %v)", step, err)
				}
				e.restart()
				if err == nil {
					// A caller holding a credential must find its lease,
					// promoted by the start-up settlement if the crash
					// came before the promotion.
					if got := e.lease(l.ID); got.State != broker.StateActive {
						t.Errorf("credential %s handed out, lease is %s", c.Username, got.State)
					}
					if !e.roleExists(c.Username) {
						t.Errorf("credential %s handed out, its user does not exist", c.Username)
					}
				}
				all, _, lerr := e.store.ListLeases(context.Background(), broker.LeaseFilter{})
				if lerr != nil {
					t.Fatal(lerr)
				}
				for _, got := range all {
					if got.State == broker.StateIssuing {
						t.Errorf("lease %s left Issuing after the restart", got.ID)
					}
				}
				intents, _ := e.store.ListIntents(context.Background())
				if len(intents) != 0 {
					t.Errorf("%d intents left after restart", len(intents))
				}
				e.assertNoOrphans()
			})
		}
	}
	revokeSteps := []string{
		"before UpdateLease:revoking", "after UpdateLease:revoking",
		"before DeleteUser", "after DeleteUser",
		"before UpdateLease:revoked", "after UpdateLease:revoked",
	}
	for _, step := range revokeSteps {
		t.Run("revoke/"+step, func(t *testing.T) {
			e := newEnv(t)
			l, c := e.issue(roleRO, 0)
			e.sw.crashAt(step)
			_, _ = e.b.Revoke(context.Background(), l.ID)
			if !e.sw.isTripped() {
				t.Fatalf("crash point %q never reached", step)
			}
			e.restart()
			got := e.lease(l.ID)
			if got.State == broker.StateRevoking {
				// A revocation was under way: start-up finishes it.
				got = e.waitState(l.ID, broker.StateRevoked)
			}
			if got.State.Terminal() && e.roleExists(c.Username) {
				t.Errorf("lease %s but user %s exists", got.State, c.Username)
			}
			e.assertNoOrphans()
		})
	}
}

func TestNoPasswordInLogsStoreOrServerLog(t *testing.T) {
	e := newEnv(t)
	var passwords []string
	for range 3 {
		_, c := e.issue(roleRO, 0)
		passwords = append(passwords, c.Password)
	}
	// A failing issue: the proxy role is gone, so CREATE ROLE fails and
	// PostgreSQL logs the failing statement (log_min_error_statement).
	e2 := newEnv(t, func(c *broker.Config) {
		c.Roles = append(c.Roles, broker.Role{Name: "broken", Target: "main", ProxyRole: "no_such_proxy_role", DefaultTTL: time.Minute, MaxTTL: time.Minute})
	})
	_, _, issueErr := e2.b.Issue(context.Background(), broker.IssueRequest{Role: "broken"})
	if issueErr == nil {
		t.Fatal("issue with a missing proxy role succeeded")
	}
	e.assertNoOrphans()
	e2.assertNoOrphans()
	if len(e2.db.passwords) != 1 {
		t.Fatalf("the failing issue sent %d passwords to the engine, want 1", len(e2.db.passwords))
	}
	passwords = append(passwords, e2.db.passwords...)
	if strings.Contains(issueErr.Error(), e2.db.passwords[0]) {
		t.Errorf("the failed issue's error holds its password: %v", issueErr)
	}

	e.close()
	e2.close()
	raw, err := os.ReadFile(e.storePath)
	if err != nil {
		t.Fatal(err)
	}
	auditLog, err := os.ReadFile(e.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	failedAudit, err := os.ReadFile(e2.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(auditLog, []byte(`"issue"`)) {
		t.Error("the audit log has no issue record; the audit check proves nothing")
	}
	serverLog := pgtest.Server(t).Log()
	for _, p := range passwords {
		if bytes.Contains(raw, []byte(p)) {
			t.Error("a password is in the bbolt file")
		}
		if bytes.Contains(auditLog, []byte(p)) || bytes.Contains(failedAudit, []byte(p)) {
			t.Error("a password is in the audit log")
		}
		if strings.Contains(e.logs.String(), p) || strings.Contains(e2.logs.String(), p) {
			t.Error("a password is in the broker log")
		}
		if bytes.Contains(serverLog, []byte(p)) {
			t.Error("a password is in the PostgreSQL server log")
		}
	}
	if !bytes.Contains(serverLog, []byte("CREATE ROLE")) && pgtest.Server(t).HasLog() {
		t.Error("the server log has no CREATE ROLE: log_statement=all is not in effect, so this test proves nothing")
	}
	if !slices.ContainsFunc(strings.Split(e.logs.String(), "\n"), func(s string) bool { return strings.Contains(s, "lease issued") }) {
		t.Error("the broker logged no issue at all; the log check proves nothing")
	}
}

func TestRenewOfUserDroppedOutsideTheBrokerEndsTheLease(t *testing.T) {
	e := newEnv(t)
	l, c := e.issue(roleRO, 0)
	conn, err := pgx.Connect(context.Background(), e.target.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), "DROP ROLE "+pgx.Identifier{c.Username}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	if _, err := e.b.Renew(context.Background(), l.ID, 30*time.Minute); !errors.Is(err, broker.ErrLeaseRevoked) {
		t.Fatalf("renew: err = %v, want ErrLeaseRevoked", err)
	}
	if s := e.lease(l.ID).State; s != broker.StateRevoked {
		t.Errorf("lease is %s, want revoked", s)
	}
}
