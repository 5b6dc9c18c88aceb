package postgres_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/privcheck"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// uses maps every proxy role of the target to a broker role of the same
// logical name.
func (f *fixture) uses(names ...string) []privcheck.ProxyRoleUse {
	var out []privcheck.ProxyRoleUse
	for _, n := range names {
		proxy := f.tg.ProxyRoles[n]
		if proxy == "" {
			proxy = n // a role the target does not have
		}
		out = append(out, privcheck.ProxyRoleUse{BrokerRole: n, ProxyRole: proxy})
	}
	return out
}

// findings indexes findings by "check role".
func findings(fs []privcheck.Finding) map[string]privcheck.Finding {
	m := map[string]privcheck.Finding{}
	for _, f := range fs {
		m[f.Check+" "+f.Role] = f
	}
	return m
}

func TestCheckPrivilegesClean(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	fs, err := f.e.CheckPrivileges(f.ctx, f.uses("read_only", "updater"))
	if err != nil {
		t.Fatalf("CheckPrivileges: %v", err)
	}
	if len(fs) != 0 {
		t.Fatalf("a target set up as AdminSetupSQL says has findings: %+v", fs)
	}
}

func TestCheckPrivilegesFindings(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "read_only", Privileges: []string{"ALL"}},
		{Name: "reader", Privileges: []string{"SELECT", "INSERT"}},
		{Name: "updater", Privileges: []string{"ALL"}},
		{Name: "loader", Privileges: []string{"SELECT", "UPDATE"}},
		{Name: "loader2", Privileges: []string{"SELECT", "UPDATE"}},
		{Name: "login", Privileges: []string{"SELECT"}, Login: true},
		{Name: "powerful", Privileges: []string{"DELETE"}},
		{Name: "nested", Privileges: []string{"TRIGGER"}},
		{Name: "empty"},
	}})
	super := f.super(t)
	q := postgres.QuoteIdentifier
	// A superuser role the "nested" proxy belongs to: issued users could SET
	// ROLE to it.
	boss := f.tg.Database + "_boss"
	for _, sql := range []string{
		"ALTER ROLE " + q(f.tg.ProxyRoles["powerful"]) + " CREATEROLE BYPASSRLS",
		"CREATE ROLE " + q(boss) + " NOLOGIN SUPERUSER",
		"GRANT " + q(boss) + " TO " + q(f.tg.ProxyRoles["nested"]),
		"GRANT pg_write_server_files TO " + q(f.tg.ProxyRoles["loader2"]),
	} {
		if _, err := super.Exec(f.ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), pgtest.Server(t).SuperURL("postgres"))
		if err == nil {
			_, _ = c.Exec(context.Background(), "DROP ROLE IF EXISTS "+q(boss))
			_ = c.Close(context.Background())
		}
	})

	fs, err := f.e.CheckPrivileges(f.ctx, f.uses("read_only", "reader", "updater", "loader", "loader2",
		"login", "powerful", "nested", "empty", "no_such_role"))
	if err != nil {
		t.Fatalf("CheckPrivileges: %v", err)
	}
	got := findings(fs)
	p := f.tg.ProxyRoles
	for _, want := range []struct {
		check, role string
		severity    privcheck.Severity
		message     string
		fix         string
	}{
		{privcheck.CheckReadOnlyWrites, p["read_only"], privcheck.SeverityCritical, "ALL privileges on table demo", "GRANT SELECT ON demo"},
		{privcheck.CheckReadOnlyWrites, p["reader"], privcheck.SeverityHigh, "may INSERT on table demo", "REVOKE INSERT ON TABLE demo"},
		{privcheck.CheckProxyGrantAll, p["updater"], privcheck.SeverityMedium, "ALL privileges on table demo", "REVOKE ALL ON demo"},
		{privcheck.CheckOverlap, p["loader"], privcheck.SeverityMedium, p["loader2"], ""},
		{privcheck.CheckProxyLogin, p["login"], privcheck.SeverityHigh, "can log in", "NOLOGIN"},
		{privcheck.CheckProxyAttribute, p["powerful"], privcheck.SeverityCritical, "CREATEROLE", "NOCREATEROLE"},
		{privcheck.CheckProxyAttribute, p["nested"], privcheck.SeverityCritical, "SUPERUSER through its membership in \"" + boss + "\"", "NOSUPERUSER"},
		{privcheck.CheckProxyAttribute, p["loader2"], privcheck.SeverityCritical, "pg_write_server_files", "REVOKE \"pg_write_server_files\" FROM " + q(p["loader2"])},
		{privcheck.CheckNoPrivileges, p["empty"], privcheck.SeverityLow, "no privileges", ""},
		{privcheck.CheckProxyMissing, "no_such_role", privcheck.SeverityHigh, "does not exist", "CREATE ROLE \"no_such_role\" NOLOGIN"},
	} {
		t.Run(want.check+"/"+want.role, func(t *testing.T) {
			var fnd privcheck.Finding
			ok := false
			for _, c := range fs {
				if c.Check == want.check && c.Role == want.role && (!ok || strings.Contains(c.Message, want.message)) {
					fnd, ok = c, true
				}
			}
			if !ok {
				t.Fatalf("no %s finding for %s; got %+v", want.check, want.role, fs)
			}
			if fnd.Severity != want.severity {
				t.Errorf("severity %v, want %v", fnd.Severity, want.severity)
			}
			if !strings.Contains(fnd.Message, want.message) {
				t.Errorf("message %q does not mention %q", fnd.Message, want.message)
			}
			if !strings.Contains(fnd.Fix, want.fix) {
				t.Errorf("fix %q does not contain %q", fnd.Fix, want.fix)
			}
		})
	}
	// BYPASSRLS is reported too, as a finding of its own.
	n := 0
	for _, fnd := range fs {
		if fnd.Role == p["powerful"] && strings.Contains(fnd.Message, "BYPASSRLS") {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d BYPASSRLS findings for %s, want 1", n, p["powerful"])
	}
	for i := 1; i < len(fs); i++ {
		if fs[i].Severity > fs[i-1].Severity {
			t.Fatalf("findings not sorted most severe first: %v before %v", fs[i-1].Severity, fs[i].Severity)
		}
	}
	// A finding's fix really fixes it: run the read_only one and check again.
	if _, err := super.Exec(f.ctx, got[privcheck.CheckReadOnlyWrites+" "+p["read_only"]].Fix); err != nil {
		t.Fatalf("running the fix: %v", err)
	}
	fs, err = f.e.CheckPrivileges(f.ctx, f.uses("read_only"))
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 0 {
		t.Errorf("after the fix: %+v", fs)
	}
}

func TestCheckPrivilegesAdminSuperuser(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	super := f.super(t)
	q := postgres.QuoteIdentifier
	// Make the admin a superuser without its minimal grants, as an operator
	// who took a shortcut would have it.
	for _, sql := range []string{
		"ALTER ROLE " + q(f.tg.AdminUser) + " SUPERUSER",
		"REVOKE " + q(f.tg.ProxyRoles["read_only"]) + " FROM " + q(f.tg.AdminUser),
		"REVOKE pg_signal_backend FROM " + q(f.tg.AdminUser),
	} {
		if _, err := super.Exec(f.ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	e, err := postgres.New(f.ctx, f.tg.EngineConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	uses := f.uses("read_only", "updater")
	fs, err := e.CheckPrivileges(f.ctx, uses)
	if err != nil {
		t.Fatal(err)
	}
	got := findings(fs)
	fnd, ok := got[privcheck.CheckAdminSuperuser+" "+f.tg.AdminUser]
	if !ok || fnd.Severity != privcheck.SeverityHigh {
		t.Fatalf("no high admin-superuser finding: %+v", fs)
	}
	for _, want := range []string{"NOSUPERUSER CREATEROLE", "GRANT " + q(f.tg.ProxyRoles["read_only"]), "pg_signal_backend", f.tg.MarkerRole} {
		if !strings.Contains(fnd.Fix, want) {
			t.Errorf("fix does not contain %q:\n%s", want, fnd.Fix)
		}
	}

	// The printed SQL, run by another superuser, leaves an admin the
	// engine accepts and the check no longer flags.
	if _, err := super.Exec(f.ctx, fnd.Fix); err != nil {
		t.Fatalf("running the fix: %v", err)
	}
	e2, err := postgres.New(f.ctx, f.tg.EngineConfig())
	if err != nil {
		t.Fatalf("New after the fix: %v", err)
	}
	defer e2.Close()
	for _, u := range uses {
		if err := e2.CheckProxyRole(f.ctx, u.ProxyRole); err != nil {
			t.Errorf("after the fix: %v", err)
		}
	}
	if fs, err := e2.CheckPrivileges(f.ctx, uses); err != nil || len(fs) != 0 {
		t.Errorf("after the fix: %+v, %v", fs, err)
	}
}

func TestStaleRoles(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	activity := []privcheck.LeaseActivity{
		{BrokerRole: "fresh", LastIssued: now.Add(-2 * day)},
		{BrokerRole: "old", LastIssued: now.Add(-40 * day)},
		{BrokerRole: "never"},
	}
	t.Run("retention covers the window", func(t *testing.T) {
		got := findings(privcheck.StaleRoles(activity, 30*day, 90*day, now))
		if len(got) != 2 {
			t.Fatalf("got %+v, want old and never", got)
		}
		if f := got["stale old"]; f.Severity != privcheck.SeverityLow || !strings.Contains(f.Message, "40 days ago") {
			t.Errorf("old: %+v", f)
		}
		if f := got["stale never"]; f.Severity != privcheck.SeverityLow || !strings.Contains(f.Message, "30 days") {
			t.Errorf("never: %+v", f)
		}
	})
	t.Run("retention shorter than the window", func(t *testing.T) {
		got := findings(privcheck.StaleRoles(activity, 30*day, day, now))
		if f := got["stale never"]; f.Severity != privcheck.SeverityInfo || !strings.Contains(f.Message, "tombstone_retention") {
			t.Errorf("never: %+v", f)
		}
	})
}

func TestParseSeverity(t *testing.T) {
	for _, s := range []privcheck.Severity{privcheck.SeverityInfo, privcheck.SeverityLow, privcheck.SeverityMedium, privcheck.SeverityHigh, privcheck.SeverityCritical} {
		got, err := privcheck.ParseSeverity(strings.ToUpper(s.String()))
		if err != nil || got != s {
			t.Errorf("ParseSeverity(%q) = %v, %v", s, got, err)
		}
	}
	if _, err := privcheck.ParseSeverity("severe"); err == nil {
		t.Error("ParseSeverity(severe) succeeded")
	}
}
