package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// TestLeaseUsageAndAuditUsage: a brokerd with an audit log issues two
// credentials; one logs in (application_name set) and a sample runs.
// lookup and leases show the usage, lookup --json carries it, and audit
// usage over the real audit file counts issued, used, unused and sessions,
// joining brokerd's live leases with --live.
func TestLeaseUsageAndAuditUsage(t *testing.T) {
	ctx := context.Background()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	auditPath := filepath.Join(dir, "audit.log")
	f, err := config.Parse([]byte(fmt.Sprintf(`store: {path: %q}
targets:
  - {name: main, url: %q, password_file: %q, marker_role: %s}
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 15m, max_ttl: 1h}
dsn_sslmode: disable
audit: {path: %q}
activity: {sample_interval: 1h}
`, filepath.Join(dir, "leases.db"), tg.AdminURL, pw, tg.MarkerRole, tg.ProxyRoles["read_only"], auditPath)))
	addr, d := serveDaemon(t, f, err, nil)
	b := &testBroker{addr: addr, target: tg}

	used := fields(b.ok(t, "issue", "read_only"))
	unused := fields(b.ok(t, "issue", "read_only"))
	pc, err := pgx.ParseConfig(used["dsn"])
	if err != nil {
		t.Fatal(err)
	}
	pc.RuntimeParams["application_name"] = "ledger-api"
	conn, err := pgx.ConnectConfig(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	before := time.Now().UTC().Add(-time.Second)
	if _, err := d.Broker().SampleActivity(ctx); err != nil {
		t.Fatal(err)
	}

	looked := fields(b.ok(t, "lookup", used["lease_id"]))
	if looked["sessions"] != "1 (peak 1, 1 seen)" || looked["application_name"] != "ledger-api" {
		t.Errorf("lookup of the used lease printed %q", looked)
	}
	if seen, err := time.Parse(time.RFC3339, looked["first_seen"]); err != nil || seen.Before(before.Truncate(time.Second)) {
		t.Errorf("first_seen %q (%v)", looked["first_seen"], err)
	}
	if got := fields(b.ok(t, "lookup", unused["lease_id"]))["sessions"]; got != "0 (never seen connected)" {
		t.Errorf("lookup of the unused lease: sessions %q", got)
	}
	var lj struct {
		Lease struct {
			Usage struct {
				Sessions        int    `json:"sessions"`
				ApplicationName string `json:"applicationName"`
				FirstSeenTime   string `json:"firstSeenTime"`
			} `json:"usage"`
		} `json:"lease"`
	}
	if err := json.Unmarshal([]byte(b.ok(t, "--json", "lookup", used["lease_id"])), &lj); err != nil {
		t.Fatal(err)
	}
	if u := lj.Lease.Usage; u.Sessions != 1 || u.ApplicationName != "ledger-api" || u.FirstSeenTime == "" {
		t.Errorf("lookup --json usage %+v", u)
	}
	for _, row := range tableRows(b.ok(t, "leases"))[1:] {
		switch row[0] {
		case used["lease_id"]:
			if row[6] != "1" || row[7] == "never" {
				t.Errorf("leases row of the used lease %q", row)
			}
		case unused["lease_id"]:
			if row[6] != "0" || row[7] != "never" {
				t.Errorf("leases row of the unused lease %q", row)
			}
		}
	}

	// Revoking ends the session; its audit record carries the usage.
	b.ok(t, "revoke", used["lease_id"])

	header := []string{"ROLE", "IDENTITY", "ISSUED", "USED", "UNUSED", "SESSIONS", "RENEWED", "REVOKED", "UNUSED_REVOKED", "EXPIRED", "DENIED", "QUOTA"}
	rowFor := func(out string) []string {
		t.Helper()
		rows := tableRows(out)
		if fmt.Sprint(rows[0]) != fmt.Sprint(header) {
			t.Fatalf("header %q", rows[0])
		}
		for _, r := range rows[1:] {
			if r[0] == "read_only" && r[1] == server.LocalIdentityName {
				return r
			}
		}
		t.Fatalf("no read_only row for %s in\n%s", server.LocalIdentityName, out)
		return nil
	}
	// From the file alone: the live unused lease is in neither column.
	got := rowFor(b.ok(t, "audit", "usage", auditPath))
	if want := []string{"read_only", server.LocalIdentityName, "2", "1", "0", "1", "0", "1", "0", "0", "0", "0"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("audit usage row %q, want %q", got, want)
	}
	// Joined with brokerd's leases: it is unused.
	got = rowFor(b.ok(t, "audit", "usage", auditPath, "--live"))
	if want := []string{"read_only", server.LocalIdentityName, "2", "1", "1", "1", "0", "1", "0", "0", "0", "0"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("audit usage --live row %q, want %q", got, want)
	}
	trail, err := os.ReadFile(auditPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{used["password"], unused["password"]} {
		if strings.Contains(string(trail), secret) {
			t.Error("the audit log holds a password")
		}
	}
	if !strings.Contains(string(trail), `"event":"first_use"`) || !strings.Contains(string(trail), `"application_name":"ledger-api"`) {
		t.Errorf("the audit log lacks the first_use record with the application name:\n%s", trail)
	}
}
