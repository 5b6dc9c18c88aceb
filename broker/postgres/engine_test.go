package postgres_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// fixture is one target and an Engine connected as its non-superuser admin.
type fixture struct {
	tg  *pgtest.Target
	e   *postgres.Engine
	ctx context.Context
}

func newFixture(t *testing.T, opts pgtest.TargetOptions) *fixture {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	t.Cleanup(cancel)
	tg := pgtest.Server(t).NewTarget(t, opts)
	e, err := postgres.New(ctx, tg.EngineConfig())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(e.Close)
	return &fixture{tg: tg, e: e, ctx: ctx}
}

func randomName(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// issue creates a user in the given (logical) proxy role and returns its
// name and password.
func (f *fixture) issue(t *testing.T, proxy string, validUntil time.Time) (string, string) {
	t.Helper()
	user, password := randomName("u_"), randomName("P")
	err := f.e.NewUser(f.ctx, broker.NewUserRequest{
		Username: user, Password: password, ProxyRole: f.tg.ProxyRoles[proxy], ValidUntil: validUntil,
	})
	if err != nil {
		t.Fatalf("NewUser: %v", err)
	}
	return user, password
}

func (f *fixture) login(user, password string) (*pgx.Conn, error) {
	return pgx.Connect(f.ctx, f.tg.URL(user, password))
}

func (f *fixture) mustLogin(t *testing.T, user, password string) *pgx.Conn {
	t.Helper()
	conn, err := f.login(user, password)
	if err != nil {
		t.Fatalf("login as %s: %v", user, err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// super is a superuser connection to the target database, to inspect
// what the engine did.
func (f *fixture) super(t *testing.T) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(f.ctx, f.tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func roleExists(t *testing.T, ctx context.Context, conn *pgx.Conn, role string) bool {
	t.Helper()
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_roles WHERE rolname = $1", role).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n == 1
}

func hour() time.Time { return time.Now().Add(time.Hour) }

func TestEngineRunsAsNonSuperuser(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	var super bool
	if err := f.super(t).QueryRow(f.ctx, "SELECT rolsuper FROM pg_roles WHERE rolname = $1", f.e.AdminRole()).Scan(&super); err != nil {
		t.Fatal(err)
	}
	if super || f.e.AdminRole() != f.tg.AdminUser {
		t.Fatalf("engine runs as %q (superuser %v), want the target's non-superuser admin %q", f.e.AdminRole(), super, f.tg.AdminUser)
	}
	if got := f.e.Endpoint(); got.Host != pgtest.Server(t).Host || got.Port != pgtest.Server(t).Port || got.Database != f.tg.Database {
		t.Errorf("Endpoint() = %+v, want %s:%d/%s", got, pgtest.Server(t).Host, pgtest.Server(t).Port, f.tg.Database)
	}
}

func TestIssuedUserPrivileges(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)
	tests := []struct {
		proxy           string
		selectOK, insOK bool
	}{
		{"read_only", true, false},
		{"updater", true, true},
	}
	for _, tt := range tests {
		t.Run(tt.proxy, func(t *testing.T) {
			user, password := f.issue(t, tt.proxy, hour())

			// The server stores the verifier we sent, never a hash of its own making.
			var stored string
			if err := super.QueryRow(f.ctx, "SELECT rolpassword FROM pg_authid WHERE rolname = $1", user).Scan(&stored); err != nil {
				t.Fatal(err)
			}
			if !verifierFormat.MatchString(stored) {
				t.Errorf("stored password %q is not a SCRAM-SHA-256 verifier", stored)
			}

			if _, err := f.login(user, password+"x"); err == nil {
				t.Fatal("login with a wrong password succeeded")
			}
			conn := f.mustLogin(t, user, password)
			var current, session string
			if err := conn.QueryRow(f.ctx, "SELECT current_user, session_user").Scan(&current, &session); err != nil {
				t.Fatal(err)
			}
			if current != f.tg.ProxyRoles[tt.proxy] || session != user {
				t.Errorf("current_user, session_user = %s, %s; want %s, %s", current, session, f.tg.ProxyRoles[tt.proxy], user)
			}

			var n int
			err := conn.QueryRow(f.ctx, "SELECT count(*) FROM demo").Scan(&n)
			if (err == nil) != tt.selectOK {
				t.Errorf("SELECT: %v, want ok %v", err, tt.selectOK)
			}
			_, err = conn.Exec(f.ctx, "INSERT INTO demo (note) VALUES ('x')")
			if (err == nil) != tt.insOK {
				t.Errorf("INSERT: %v, want ok %v", err, tt.insOK)
			}
			var pgErr *pgconn.PgError
			if err != nil && (!errors.As(err, &pgErr) || pgErr.Code != "42501") {
				t.Errorf("INSERT failed with %v, want permission denied (42501)", err)
			}
		})
	}
}

// TestLiveUserIsNotTheAdmins: a live user is not granted to the admin.
// Every role the admin belongs to makes its next CREATE ROLE slower, so
// the engine grants a user to the admin only when it drops it.
func TestLiveUserIsNotTheAdmins(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	user, _ := f.issue(t, "read_only", hour())
	var usage bool
	if err := f.super(t).QueryRow(f.ctx, "SELECT pg_has_role($1, $2, 'USAGE')", f.e.AdminRole(), user).Scan(&usage); err != nil {
		t.Fatal(err)
	}
	if usage {
		t.Errorf("the admin %s has the privileges of the live user %s", f.e.AdminRole(), user)
	}
}

func validUntil(t *testing.T, f *fixture, conn *pgx.Conn, user string) time.Time {
	t.Helper()
	var v time.Time
	if err := conn.QueryRow(f.ctx, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", user).Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestValidUntil(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)

	// Issued already expired: the password no longer opens the door.
	past := time.Now().Add(-time.Minute).Truncate(time.Microsecond)
	user, password := f.issue(t, "read_only", past)
	if got := validUntil(t, f, super, user); !got.Equal(past) {
		t.Fatalf("rolvaliduntil = %v, want %v", got, past)
	}
	if _, err := f.login(user, password); err == nil {
		t.Fatal("login succeeded past VALID UNTIL")
	}

	future := time.Now().Add(2 * time.Hour).Truncate(time.Microsecond)
	if err := f.e.RenewUser(f.ctx, broker.RenewUserRequest{Username: user, ValidUntil: future}); err != nil {
		t.Fatalf("RenewUser: %v", err)
	}
	if got := validUntil(t, f, super, user); !got.Equal(future) {
		t.Fatalf("after RenewUser rolvaliduntil = %v, want %v", got, future)
	}
	f.mustLogin(t, user, password)

	t.Run("missing user", func(t *testing.T) {
		err := f.e.RenewUser(f.ctx, broker.RenewUserRequest{Username: "u_no_such_user", ValidUntil: future})
		if !errors.Is(err, postgres.ErrUserNotFound) {
			t.Fatalf("RenewUser of a missing user = %v, want ErrUserNotFound", err)
		}
	})
	t.Run("foreign roles are not touched", func(t *testing.T) {
		for _, role := range []string{f.tg.AdminUser, f.tg.ProxyRoles["read_only"], "postgres"} {
			before := super.QueryRow(f.ctx, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", role)
			var b *time.Time
			if err := before.Scan(&b); err != nil {
				t.Fatal(err)
			}
			if err := f.e.RenewUser(f.ctx, broker.RenewUserRequest{Username: role, ValidUntil: future}); err == nil {
				t.Errorf("RenewUser(%s) succeeded on a role the broker did not create", role)
			}
			var a *time.Time
			if err := super.QueryRow(f.ctx, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", role).Scan(&a); err != nil {
				t.Fatal(err)
			}
			if (a == nil) != (b == nil) || (a != nil && !a.Equal(*b)) {
				t.Errorf("rolvaliduntil of %s changed from %v to %v", role, b, a)
			}
		}
	})
}

func TestDeleteUserEndsSessions(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)
	user, password := f.issue(t, "read_only", hour())
	conn := f.mustLogin(t, user, password)

	queryErr := make(chan error, 1)
	go func() {
		_, err := conn.Exec(context.Background(), "SELECT pg_sleep(30)")
		queryErr <- err
	}()
	// Wait until the session is really inside pg_sleep.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := super.QueryRow(f.ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE usename = $1 AND state = 'active' AND query LIKE 'SELECT pg_sleep%'`, user).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the session never started pg_sleep")
		}
		time.Sleep(5 * time.Millisecond) // polling the server, not waiting for an outcome
	}

	start := time.Now()
	if err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: user, ProxyRole: f.tg.ProxyRoles["read_only"]}); err != nil {
		t.Fatalf("DeleteUser: %v", err)
	}
	select {
	case err := <-queryErr:
		if err == nil {
			t.Fatal("pg_sleep(30) finished without error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the session survived DeleteUser")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("DeleteUser took %v", d)
	}
	if roleExists(t, f.ctx, super, user) {
		t.Error("the role still exists")
	}
	var sessions int
	if err := super.QueryRow(f.ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", user).Scan(&sessions); err != nil {
		t.Fatal(err)
	}
	if sessions != 0 {
		t.Errorf("%d sessions of the user remain", sessions)
	}
	if _, err := f.login(user, password); err == nil {
		t.Error("login succeeded after DeleteUser")
	}
}

func TestDeleteUserWithOwnedObjects(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "owner", Privileges: []string{"SELECT"}, CreateOnSchema: true},
	}})
	proxy := f.tg.ProxyRoles["owner"]
	super := f.super(t)

	// A second database where the user owns a table too: DeleteUser must
	// find it (pg_shdepend) and clean it up there.
	otherDB := f.tg.Database + "_other"
	if _, err := super.Exec(f.ctx, "CREATE DATABASE "+otherDB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), pgtest.Server(t).SuperURL("postgres"))
		if err == nil {
			_, _ = c.Exec(context.Background(), "DROP DATABASE IF EXISTS "+otherDB+" WITH (FORCE)")
			_ = c.Close(context.Background())
		}
	})
	otherSuperURL := pgtest.Server(t).SuperURL(otherDB)
	otherSuper, err := pgx.Connect(f.ctx, otherSuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer otherSuper.Close(f.ctx)
	if _, err := otherSuper.Exec(f.ctx, "GRANT CREATE ON SCHEMA public TO "+proxy); err != nil {
		t.Fatal(err)
	}

	user, password := f.issue(t, "owner", hour())
	conn := f.mustLogin(t, user, password)
	for _, sql := range []string{
		"CREATE TABLE by_proxy (x int)", // owned by the proxy role (SET role)
		"RESET ROLE",                    // back to the role default: still the proxy
		"CREATE TABLE after_reset (x int)",
		"SET ROLE NONE", // now the user itself
		"CREATE TABLE by_user (x int)",
		// Default privileges are not reassigned, only dropped (DROP OWNED);
		// left behind, they would block DROP ROLE.
		"ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO " + proxy,
	} {
		if _, err := conn.Exec(f.ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	otherURL := strings.Replace(f.tg.URL(user, password), "/"+f.tg.Database+"?", "/"+otherDB+"?", 1)
	other, err := pgx.Connect(f.ctx, otherURL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Exec(f.ctx, "SET ROLE NONE; CREATE TABLE other_by_user (x int)"); err != nil {
		t.Fatal(err)
	}
	_ = other.Close(f.ctx)

	owner := func(c *pgx.Conn, table string) string {
		t.Helper()
		var o string
		if err := c.QueryRow(f.ctx, "SELECT tableowner FROM pg_tables WHERE tablename = $1", table).Scan(&o); err != nil {
			t.Fatalf("owner of %s: %v", table, err)
		}
		return o
	}
	if got := owner(super, "by_proxy"); got != proxy {
		t.Errorf("table created under SET role is owned by %s, want the proxy role %s", got, proxy)
	}
	if got := owner(super, "by_user"); got != user {
		t.Fatalf("table created after SET ROLE NONE is owned by %s, want the user", got)
	}

	req := broker.DeleteUserRequest{Username: user, ProxyRole: proxy}
	if err := f.e.DeleteUser(f.ctx, req); err != nil {
		t.Fatalf("DeleteUser: %v", err)
	}
	if roleExists(t, f.ctx, super, user) {
		t.Fatal("the role still exists")
	}
	for _, c := range []struct {
		conn  *pgx.Conn
		table string
	}{{super, "by_proxy"}, {super, "after_reset"}, {super, "by_user"}, {otherSuper, "other_by_user"}} {
		if got := owner(c.conn, c.table); got != proxy {
			t.Errorf("after DeleteUser %s is owned by %s, want the proxy role %s", c.table, got, proxy)
		}
	}

	t.Run("twice", func(t *testing.T) {
		if err := f.e.DeleteUser(f.ctx, req); err != nil {
			t.Fatalf("second DeleteUser: %v", err)
		}
	})
}

func TestDeleteUserIdempotentAndGuarded(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)
	proxy := f.tg.ProxyRoles["read_only"]

	// A role the broker did not make, although it could pass for one.
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

	tests := []struct {
		name, user string
		wantErr    bool
	}{
		{"never existed", "u_never_existed", false},
		{"the admin", f.tg.AdminUser, true},
		{"a proxy role", proxy, true},
		{"the superuser", "postgres", true},
		{"not a member of the marker role", stranger, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			existed := roleExists(t, f.ctx, super, tt.user)
			err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: tt.user, ProxyRole: proxy})
			if (err != nil) != tt.wantErr {
				t.Fatalf("DeleteUser(%s) = %v, want error %v", tt.user, err, tt.wantErr)
			}
			if existed && !roleExists(t, f.ctx, super, tt.user) {
				t.Fatalf("DeleteUser dropped %s", tt.user)
			}
		})
	}

	t.Run("issued user twice", func(t *testing.T) {
		user, _ := f.issue(t, "read_only", hour())
		for i := range 2 {
			if err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: user, ProxyRole: proxy}); err != nil {
				t.Fatalf("DeleteUser #%d: %v", i+1, err)
			}
		}
		if roleExists(t, f.ctx, super, user) {
			t.Fatal("the role still exists")
		}
	})
}

func TestNoPasswordInServerLog(t *testing.T) {
	t.Parallel()
	srv := pgtest.Server(t)
	if !srv.HasLog() {
		t.Skip("the external server's log cannot be read")
	}
	f := newFixture(t, pgtest.TargetOptions{})

	// A failing CREATE ROLE: PostgreSQL logs the whole statement
	// (log_min_error_statement = error), so only a verifier may be in it.
	failedUser, failedPassword := randomName("u_"), randomName("FailPw")
	err := f.e.NewUser(f.ctx, broker.NewUserRequest{
		Username: failedUser, Password: failedPassword, ProxyRole: "no_such_proxy_role", ValidUntil: hour(),
	})
	if err == nil {
		t.Fatal("NewUser with a missing proxy role succeeded")
	}
	if strings.Contains(err.Error(), failedPassword) {
		t.Fatalf("the error contains the password: %v", err)
	}
	if strings.Contains(err.Error(), "SCRAM-SHA-256$") {
		t.Errorf("the error contains the verifier: %v", err)
	}

	user, password := f.issue(t, "read_only", hour())
	if err := f.e.RenewUser(f.ctx, broker.RenewUserRequest{Username: user, ValidUntil: hour()}); err != nil {
		t.Fatal(err)
	}
	f.mustLogin(t, user, password).Close(f.ctx)
	if err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: user, ProxyRole: f.tg.ProxyRoles["read_only"]}); err != nil {
		t.Fatal(err)
	}

	log := string(srv.Log())
	for _, pw := range []string{failedPassword, password} {
		if strings.Contains(log, pw) {
			t.Errorf("the server log contains a cleartext password")
		}
	}
	// The log must really hold the statements, or the check above proves
	// nothing.
	if !strings.Contains(log, `STATEMENT:  CREATE ROLE "`+failedUser+`"`) {
		t.Errorf("the server log does not show the failing CREATE ROLE")
	}
	if !strings.Contains(log, `CREATE ROLE "`+user+`" LOGIN`) || !strings.Contains(log, "PASSWORD 'SCRAM-SHA-256$4096:") {
		t.Errorf("the server log does not show the successful CREATE ROLE with its verifier")
	}
}

func TestListManagedUsers(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	list := func() []string {
		t.Helper()
		users, err := f.e.ListManagedUsers(f.ctx)
		if err != nil {
			t.Fatalf("ListManagedUsers: %v", err)
		}
		return users
	}
	// The admin is a member of the marker role too (ADMIN OPTION), and so
	// may be a DBA role that administers it: neither may ever be listed,
	// since the reconciler drops what is listed.
	dba := f.tg.Database + "_dba"
	if _, err := f.super(t).Exec(f.ctx, "CREATE ROLE "+dba+" NOLOGIN; GRANT "+f.tg.MarkerRole+" TO "+dba+" WITH ADMIN OPTION"); err != nil {
		t.Fatal(err)
	}
	if got := list(); len(got) != 0 {
		t.Fatalf("before any issue: %v, want none", got)
	}
	a, _ := f.issue(t, "read_only", hour())
	b, _ := f.issue(t, "updater", hour())
	want := []string{a, b}
	slices.Sort(want)
	if got := list(); !slices.Equal(got, want) {
		t.Fatalf("ListManagedUsers = %v, want %v", got, want)
	}
	if err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: a, ProxyRole: f.tg.ProxyRoles["read_only"]}); err != nil {
		t.Fatal(err)
	}
	if got := list(); !slices.Equal(got, []string{b}) {
		t.Fatalf("after deleting %s: %v, want [%s]", a, got, b)
	}
}

func TestConcurrentIssue(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	const n = 12
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			errs <- f.e.NewUser(f.ctx, broker.NewUserRequest{
				Username: randomName("u_"), Password: randomName("P"), ProxyRole: f.tg.ProxyRoles["updater"], ValidUntil: hour(),
			})
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	users, err := f.e.ListManagedUsers(f.ctx)
	if err != nil || len(users) != n {
		t.Fatalf("ListManagedUsers = %d users, %v; want %d", len(users), err, n)
	}
}

func TestNewUserRejects(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	proxy := f.tg.ProxyRoles["read_only"]
	existing, _ := f.issue(t, "read_only", hour())
	tests := []struct {
		name    string
		req     broker.NewUserRequest
		wantErr error
	}{
		{"existing user", broker.NewUserRequest{Username: existing, Password: "pw", ProxyRole: proxy, ValidUntil: hour()}, broker.ErrExists},
		{"uppercase username", broker.NewUserRequest{Username: "U_abc", Password: "pw", ProxyRole: proxy, ValidUntil: hour()}, broker.ErrInvalidArgument},
		{"injection", broker.NewUserRequest{Username: `u"; DROP ROLE postgres; --`, Password: "pw", ProxyRole: proxy, ValidUntil: hour()}, broker.ErrInvalidArgument},
		{"pg_ prefix", broker.NewUserRequest{Username: "pg_u", Password: "pw", ProxyRole: proxy, ValidUntil: hour()}, broker.ErrInvalidArgument},
		{"64 bytes", broker.NewUserRequest{Username: strings.Repeat("u", 64), Password: "pw", ProxyRole: proxy, ValidUntil: hour()}, broker.ErrInvalidArgument},
		{"empty password", broker.NewUserRequest{Username: randomName("u_"), ProxyRole: proxy, ValidUntil: hour()}, broker.ErrInvalidArgument},
		{"bad proxy role", broker.NewUserRequest{Username: randomName("u_"), Password: "pw", ProxyRole: "Bad Role", ValidUntil: hour()}, broker.ErrInvalidArgument},
		{"no valid until", broker.NewUserRequest{Username: randomName("u_"), Password: "pw", ProxyRole: proxy}, broker.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := f.e.NewUser(f.ctx, tt.req)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("NewUser = %v, want %v", err, tt.wantErr)
			}
		})
	}
	users, err := f.e.ListManagedUsers(f.ctx)
	if err != nil || !slices.Equal(users, []string{existing}) {
		t.Fatalf("after rejected requests: %v, %v; want only %s", users, err, existing)
	}
}

func TestCheckProxyRole(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "good", Privileges: []string{"SELECT"}},
		{Name: "login", Login: true},
		{Name: "ungranted", NotGranted: true},
	}})
	super := f.super(t)
	superRole := f.tg.Database + "_su"
	if _, err := super.Exec(f.ctx, "CREATE ROLE "+superRole+" NOLOGIN SUPERUSER; GRANT "+superRole+" TO "+f.tg.AdminUser+" WITH ADMIN OPTION"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), pgtest.Server(t).SuperURL("postgres"))
		if err == nil {
			_, _ = c.Exec(context.Background(), "DROP ROLE IF EXISTS "+superRole)
			_ = c.Close(context.Background())
		}
	})

	tests := []struct {
		name, role string
		wantIn     string // "" = no error
	}{
		{"good", f.tg.ProxyRoles["good"], ""},
		{"missing", "no_such_role", "does not exist"},
		{"can log in", f.tg.ProxyRoles["login"], "can log in"},
		{"not granted to the admin", f.tg.ProxyRoles["ungranted"], "GRANT \"" + f.tg.ProxyRoles["ungranted"] + "\" TO \"" + f.tg.AdminUser + "\" WITH ADMIN OPTION"},
		{"superuser", superRole, "superuser"},
		{"the marker role", f.tg.MarkerRole, "marker role"},
		{"invalid name", "Bad-Name", "invalid argument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := f.e.CheckProxyRole(f.ctx, tt.role)
			if tt.wantIn == "" {
				if err != nil {
					t.Fatalf("CheckProxyRole = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantIn) {
				t.Fatalf("CheckProxyRole = %v, want an error containing %q", err, tt.wantIn)
			}
		})
	}
}

func TestNewErrors(t *testing.T) {
	t.Parallel()
	srv := pgtest.Server(t)
	tg := srv.NewTarget(t, pgtest.TargetOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const secret = "S3cretInUrl"
	inline := strings.Replace(tg.AdminURL, tg.AdminUser+"@", tg.AdminUser+":"+secret+"@", 1)

	tests := []struct {
		name            string
		cfg             postgres.Config
		wantIn          string
		wantUnavailable bool
	}{
		{"password in URL", postgres.Config{URL: inline}, "password_file", false},
		{"password as query parameter", postgres.Config{URL: tg.AdminURL + "&password=" + secret}, "password_file", false},
		{"malformed URL", postgres.Config{URL: "postgres://u:" + secret + "@host:port/db"}, "malformed", false},
		{"not a URL", postgres.Config{URL: "host=x password=" + secret}, "postgres://", false},
		{"wrong password", postgres.Config{URL: tg.AdminURL, Password: secret}, "password authentication failed", false},
		{"nothing listening", postgres.Config{URL: "postgres://a@127.0.0.1:1/db?sslmode=disable", Password: secret, ConnectTimeout: 5 * time.Second}, "", true},
		{"invalid marker role", postgres.Config{URL: tg.AdminURL, Password: tg.AdminPassword, MarkerRole: "Marker"}, "marker role", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := postgres.New(ctx, tt.cfg)
			if err == nil {
				e.Close()
				t.Fatal("New succeeded")
			}
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("the error contains the password: %v", err)
			}
			if !strings.Contains(err.Error(), tt.wantIn) {
				t.Errorf("New = %v, want it to mention %q", err, tt.wantIn)
			}
			if got := errors.Is(err, broker.ErrUnavailable); got != tt.wantUnavailable {
				t.Errorf("errors.Is(err, ErrUnavailable) = %v, want %v (err: %v)", got, tt.wantUnavailable, err)
			}
		})
	}
}

func TestNewMarkerRole(t *testing.T) {
	t.Parallel()
	srv := pgtest.Server(t)
	tg := srv.NewTarget(t, pgtest.TargetOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	super, err := pgx.Connect(ctx, tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer super.Close(ctx)
	fresh, loginMarker := tg.Database+"_fresh", tg.Database+"_login"
	if _, err := super.Exec(ctx, "CREATE ROLE "+loginMarker+" LOGIN"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), srv.SuperURL("postgres"))
		if err == nil {
			_, _ = c.Exec(context.Background(), "DROP ROLE IF EXISTS "+fresh+"; DROP ROLE IF EXISTS "+loginMarker)
			_ = c.Close(context.Background())
		}
	})

	t.Run("created when missing", func(t *testing.T) {
		cfg := tg.EngineConfig()
		cfg.MarkerRole = fresh
		e, err := postgres.New(ctx, cfg)
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		defer e.Close()
		var canLogin bool
		if err := super.QueryRow(ctx, "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", fresh).Scan(&canLogin); err != nil {
			t.Fatalf("marker role not created: %v", err)
		}
		if canLogin {
			t.Error("the created marker role can log in")
		}
		// And it works as a marker: an issued user is listed.
		user := randomName("u_")
		if err := e.NewUser(ctx, broker.NewUserRequest{Username: user, Password: "pw", ProxyRole: tg.ProxyRoles["read_only"], ValidUntil: hour()}); err != nil {
			t.Fatal(err)
		}
		defer e.DeleteUser(ctx, broker.DeleteUserRequest{Username: user, ProxyRole: tg.ProxyRoles["read_only"]})
		if users, err := e.ListManagedUsers(ctx); err != nil || !slices.Equal(users, []string{user}) {
			t.Fatalf("ListManagedUsers = %v, %v; want [%s]", users, err, user)
		}
	})
	t.Run("refused when it can log in", func(t *testing.T) {
		cfg := tg.EngineConfig()
		cfg.MarkerRole = loginMarker
		e, err := postgres.New(ctx, cfg)
		if err == nil {
			e.Close()
			t.Fatal("New accepted a marker role that can log in")
		}
		if !strings.Contains(err.Error(), "NOLOGIN") {
			t.Errorf("error does not say what to fix: %v", err)
		}
	})
}

func TestClose(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	f.e.Close()
	f.e.Close() // idempotent
	if _, err := f.e.ListManagedUsers(f.ctx); !errors.Is(err, broker.ErrClosed) {
		t.Fatalf("ListManagedUsers after Close = %v, want ErrClosed", err)
	}
}

func TestDeleteUserWithoutKnownProxyRole(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "kept", CreateOnSchema: true},
		{Name: "gone", CreateOnSchema: true},
	}})
	super := f.super(t)
	tests := []struct {
		name, proxy string
		dropProxy   bool   // the DBA dropped the proxy role meanwhile
		wantOwner   string // "" = the table is dropped
	}{
		// Reconciliation knows no lease, hence no proxy role: the user's
		// own SET role setting names it.
		{"proxy role from the user's setting", "kept", false, f.tg.ProxyRoles["kept"]},
		{"proxy role dropped meanwhile", "gone", true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			user, password := f.issue(t, tt.proxy, hour())
			conn := f.mustLogin(t, user, password)
			table := "t_" + user
			if _, err := conn.Exec(f.ctx, "SET ROLE NONE; CREATE TABLE "+table+" (x int)"); err != nil {
				t.Fatal(err)
			}
			if tt.dropProxy {
				p := f.tg.ProxyRoles[tt.proxy]
				if _, err := super.Exec(f.ctx, "DROP OWNED BY "+p+"; DROP ROLE "+p); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.e.DeleteUser(f.ctx, broker.DeleteUserRequest{Username: user}); err != nil {
				t.Fatalf("DeleteUser without proxy role: %v", err)
			}
			if roleExists(t, f.ctx, super, user) {
				t.Fatal("the role still exists")
			}
			var owner *string
			err := super.QueryRow(f.ctx, "SELECT tableowner FROM pg_tables WHERE tablename = $1", table).Scan(&owner)
			if errors.Is(err, pgx.ErrNoRows) {
				owner = nil
			} else if err != nil {
				t.Fatal(err)
			}
			switch {
			case tt.wantOwner == "" && owner != nil:
				t.Errorf("table survived, owned by %s; want it dropped", *owner)
			case tt.wantOwner != "" && (owner == nil || *owner != tt.wantOwner):
				t.Errorf("table owner = %v, want %s", owner, tt.wantOwner)
			}
		})
	}
}

// TestNowIsTheServersClock: the expiry manager checks leases due by the
// broker's clock against the server's (broker.DatabaseClock). Server and
// test share this machine's clock, so they agree within a few seconds.
func TestNowIsTheServersClock(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	before := time.Now()
	got, err := f.e.Now(f.ctx)
	after := time.Now()
	if err != nil {
		t.Fatalf("Now: %v", err)
	}
	if got.Before(before.Add(-5*time.Second)) || got.After(after.Add(5*time.Second)) {
		t.Fatalf("Now = %v, want between %v and %v (give or take 5s)", got, before, after)
	}
}

// TestScramIterations: the engine hashes issued users' passwords at the
// target's configured iteration count (targets[].scram_iterations), and
// such a user logs in; NewUser's own hashing and HashPassword agree.
// New refuses a count outside 1..10,000,000.
func TestScramIterations(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	cfg := f.tg.EngineConfig()
	cfg.ScramIterations = 16
	e, err := postgres.New(f.ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(e.Close)
	super := f.super(t)
	for _, ahead := range []bool{false, true} {
		user, password := randomName("u_"), randomName("P")
		req := broker.NewUserRequest{Username: user, Password: password, ProxyRole: f.tg.ProxyRoles["read_only"], ValidUntil: hour()}
		if ahead {
			if req.Verifier, err = e.HashPassword(password); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.NewUser(f.ctx, req); err != nil {
			t.Fatalf("NewUser: %v", err)
		}
		var stored string
		if err := super.QueryRow(f.ctx, "SELECT rolpassword FROM pg_authid WHERE rolname = $1", user).Scan(&stored); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(stored, "SCRAM-SHA-256$16:") {
			t.Errorf("hashed ahead %v: stored verifier %q, want 16 iterations", ahead, stored)
		}
		conn := f.mustLogin(t, user, password)
		_ = conn.Close(f.ctx)
	}
	for _, n := range []int{-1, postgres.MaxScramIterations + 1} {
		cfg.ScramIterations = n
		if e, err := postgres.New(f.ctx, cfg); err == nil {
			e.Close()
			t.Errorf("New with %d iterations succeeded", n)
		}
	}
}
