package pgtest_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// lazyChildEnv marks the re-executed test binary of TestNoServerUntilAsked.
const lazyChildEnv = "PGTEST_LAZY_CHILD"

// TestNoServerUntilAsked runs this test binary again with only a test that
// never calls Server, and checks that no PostgreSQL was started for it.
func TestNoServerUntilAsked(t *testing.T) {
	if os.Getenv(lazyChildEnv) != "" {
		return // the child: needs no server
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestNoServerUntilAsked$", "-test.v")
	cmd.Env = append(os.Environ(), lazyChildEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child test binary: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "pgtest: PostgreSQL") {
		t.Errorf("a server was started for a test that never asked for one:\n%s", out)
	}
	if !strings.Contains(string(out), "PASS") {
		t.Errorf("the child ran no test:\n%s", out)
	}
}

func TestNewTarget(t *testing.T) {
	t.Parallel()
	srv := pgtest.Server(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	var tg *pgtest.Target
	t.Run("target", func(t *testing.T) {
		tg = srv.NewTarget(t, pgtest.TargetOptions{})

		if len(tg.ProxyRoles) != 2 || tg.ProxyRoles["read_only"] == "" || tg.ProxyRoles["updater"] == "" {
			t.Fatalf("default proxy roles: %v", tg.ProxyRoles)
		}
		// The admin logs in over TCP with its password and is no superuser.
		admin, err := pgx.Connect(ctx, tg.URL(tg.AdminUser, tg.AdminPassword))
		if err != nil {
			t.Fatalf("admin login: %v", err)
		}
		defer admin.Close(ctx)
		var super, createRole bool
		if err := admin.QueryRow(ctx, "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user").Scan(&super, &createRole); err != nil {
			t.Fatal(err)
		}
		if super || !createRole {
			t.Errorf("admin: superuser %v, createrole %v; want false, true", super, createRole)
		}
		if _, err := pgx.Connect(ctx, tg.URL(tg.AdminUser, "wrong")); err == nil {
			t.Error("admin logged in with a wrong password")
		}

		tests := []struct {
			role, privilege string
			want            bool
		}{
			{"read_only", "SELECT", true},
			{"read_only", "INSERT", false},
			{"updater", "INSERT", true},
			{"updater", "UPDATE", true},
			{"updater", "DELETE", false},
		}
		for _, tt := range tests {
			var got, canLogin bool
			err := admin.QueryRow(ctx, "SELECT has_table_privilege($1, 'demo', $2), rolcanlogin FROM pg_roles WHERE rolname = $1",
				tg.ProxyRoles[tt.role], tt.privilege).Scan(&got, &canLogin)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want || canLogin {
				t.Errorf("%s %s on demo: %v (login %v), want %v (no login)", tt.role, tt.privilege, got, canLogin, tt.want)
			}
		}
	})

	// The subtest's cleanup dropped everything the target made.
	conn, err := pgx.Connect(ctx, srv.SuperURL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	names := []string{tg.AdminUser, tg.MarkerRole, tg.ProxyRoles["read_only"], tg.ProxyRoles["updater"]}
	var roles, dbs int
	if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)),
		(SELECT count(*) FROM pg_database WHERE datname = $2)`, names, tg.Database).Scan(&roles, &dbs); err != nil {
		t.Fatal(err)
	}
	if roles != 0 || dbs != 0 {
		t.Errorf("after cleanup: %d roles and %d databases left", roles, dbs)
	}
}

func TestTargetsAreIsolated(t *testing.T) {
	t.Parallel()
	srv := pgtest.Server(t)
	a := srv.NewTarget(t, pgtest.TargetOptions{})
	b := srv.NewTarget(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{{Name: "read_only", Privileges: []string{"SELECT"}}}})
	if a.Database == b.Database || a.MarkerRole == b.MarkerRole || a.AdminUser == b.AdminUser ||
		a.ProxyRoles["read_only"] == b.ProxyRoles["read_only"] {
		t.Fatalf("targets share names: %+v %+v", a, b)
	}
	if len(b.ProxyRoles) != 1 {
		t.Errorf("explicit proxy roles: got %v", b.ProxyRoles)
	}
}

func TestLog(t *testing.T) {
	srv := pgtest.Server(t)
	if !srv.HasLog() {
		if srv.Log() != nil {
			t.Fatal("Log returned data although HasLog is false")
		}
		return
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, srv.SuperURL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SELECT 'pgtest-log-marker'"); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(srv.Log()), "pgtest-log-marker") {
		t.Error("the server log does not show the statement just run")
	}
}
