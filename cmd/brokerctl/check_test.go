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

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/privcheck"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/store"
)

// checkConfig writes a brokerd configuration for the target, with broker
// roles read_only and updater, and returns its path and store path.
func checkConfig(t *testing.T, tg *pgtest.Target, extra string) (string, string) {
	t.Helper()
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	storePath := filepath.Join(dir, "leases.db")
	yml := fmt.Sprintf(`store:
  path: %q
%s
targets:
  - name: main
    url: %q
    password_file: %q
    marker_role: %s
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 15m, max_ttl: 1h}
  - {name: updater, target: main, proxy_role: %s, default_ttl: 5m, max_ttl: 15m}
`, storePath, extra, tg.AdminURL, pw, tg.MarkerRole, tg.ProxyRoles["read_only"], tg.ProxyRoles["updater"])
	path := filepath.Join(dir, "brokerd.yaml")
	if err := os.WriteFile(path, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, storePath
}

type checkDoc struct {
	Severity string `json:"severity"`
	Failed   bool   `json:"failed"`
	Findings []struct {
		Severity, Check, Target, Role, Message, Fix string
	} `json:"findings"`
}

func checkJSON(t *testing.T, args ...string) (checkDoc, result) {
	t.Helper()
	r := ctl(t, append([]string{"check", "--json"}, args...)...)
	var doc checkDoc
	if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil {
		t.Fatalf("check --json printed %q (stderr %q): %v", r.stdout, r.stderr, err)
	}
	return doc, r
}

func TestCheckClean(t *testing.T) {
	t.Parallel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfg, _ := checkConfig(t, tg, "")
	r := ctl(t, "check", "--config", cfg)
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	// No store yet: only the note that the stale check had nothing to read.
	rows := tableRows(r.stdout)
	if len(rows) != 2 || rows[1][1] != "info" || !strings.Contains(r.stdout, "no lease store") {
		t.Fatalf("output:\n%s", r.stdout)
	}
}

func TestCheckFindingsAndSeverity(t *testing.T) {
	t.Parallel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{ProxyRoles: []pgtest.ProxyRole{
		{Name: "read_only", Privileges: []string{"ALL"}},
		{Name: "updater", Privileges: []string{"SELECT", "INSERT", "UPDATE"}, Login: true},
	}})
	cfg, _ := checkConfig(t, tg, "")

	r := ctl(t, "check", "--config", cfg)
	if r.code != exitFindings {
		t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", r.code, exitFindings, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, "2 finding(s) at or above severity medium") {
		t.Errorf("stderr %q", r.stderr)
	}
	rows := tableRows(r.stdout[:strings.Index(r.stdout, "\nfixes:")])
	if got := strings.Join(rows[0], "|"); got != "#|SEVERITY|TARGET|CHECK|ROLE|FINDING" {
		t.Errorf("header %q", got)
	}
	if rows[1][1] != "critical" || rows[1][3] != privcheck.CheckReadOnlyWrites || rows[1][4] != tg.ProxyRoles["read_only"] {
		t.Errorf("first row %q", rows[1])
	}
	if rows[2][1] != "high" || rows[2][3] != privcheck.CheckProxyLogin {
		t.Errorf("second row %q", rows[2])
	}
	if !strings.Contains(r.stdout, "#2\n    ALTER ROLE "+postgres.QuoteIdentifier(tg.ProxyRoles["updater"])+" NOLOGIN\n") {
		t.Errorf("fix of #2 missing:\n%s", r.stdout)
	}

	doc, r := checkJSON(t, "--config", cfg, "--severity", "critical")
	if r.code != exitFindings || !doc.Failed || doc.Severity != "critical" || len(doc.Findings) != 3 {
		t.Fatalf("--severity critical: exit %d, %+v", r.code, doc)
	}
	if f := doc.Findings[0]; f.Severity != "critical" || f.Target != "main" || !strings.Contains(f.Fix, "GRANT SELECT") {
		t.Errorf("first finding %+v", f)
	}

	// Fix the critical one: what is left is below --severity critical.
	super, err := pgx.Connect(context.Background(), tg.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer super.Close(context.Background())
	if _, err := super.Exec(context.Background(), doc.Findings[0].Fix); err != nil {
		t.Fatalf("running the printed fix: %v", err)
	}
	doc, r = checkJSON(t, "--config", cfg, "--severity", "critical")
	if r.code != 0 || doc.Failed || len(doc.Findings) != 2 {
		t.Fatalf("after the fix: exit %d, %+v", r.code, doc)
	}
}

func TestCheckStaleFromStore(t *testing.T) {
	t.Parallel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	// Ended leases kept 90 days, so 30 days of silence can be judged.
	cfg, storePath := checkConfig(t, tg, "  tombstone_retention: 2160h")
	st, err := store.Open(storePath, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	issued := time.Now().Add(-40 * 24 * time.Hour)
	err = st.CreateLease(context.Background(), &broker.Lease{
		ID: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Role: "read_only", Client: "test", Target: "main",
		Username: "cb_read_only_x", ProxyRole: tg.ProxyRoles["read_only"], State: broker.StateExpired,
		IssueTime: issued, ExpireTime: issued.Add(time.Hour), MaxExpireTime: issued.Add(time.Hour),
		EndTime: issued.Add(time.Hour),
	})
	if err != nil {
		t.Fatalf("CreateLease: %v", err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	doc, r := checkJSON(t, "--config", cfg, "--severity", "low")
	if r.code != exitFindings {
		t.Fatalf("exit %d: %+v", r.code, doc)
	}
	stale := map[string]string{}
	for _, f := range doc.Findings {
		if f.Check == privcheck.CheckStale {
			stale[f.Role] = f.Message
		}
	}
	if !strings.Contains(stale["read_only"], "40 days ago") || !strings.Contains(stale["updater"], "no lease in the last 30 days") || len(stale) != 2 {
		t.Fatalf("stale findings %q", stale)
	}
	// A longer window makes read_only fresh.
	doc, _ = checkJSON(t, "--config", cfg, "--severity", "low", "--stale-days", "60")
	for _, f := range doc.Findings {
		if f.Role == "read_only" {
			t.Errorf("read_only reported with --stale-days 60: %+v", f)
		}
	}
}

func TestCheckUsage(t *testing.T) {
	for _, args := range [][]string{
		{"check"},
		{"check", "--config", "x.yaml", "--severity", "severe"},
		{"check", "--config", "x.yaml", "--stale-days", "0"},
	} {
		if r := ctl(t, args...); r.code != 2 {
			t.Errorf("%q: exit %d, want 2 (stderr %q)", args, r.code, r.stderr)
		}
	}
}

// While brokerd holds the store, the stale check asks it over --addr.
func TestCheckStaleFromRunningBroker(t *testing.T) {
	t.Parallel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfgPath, _ := checkConfig(t, tg, "")
	f, err := config.Load(cfgPath)
	b := &testBroker{addr: serveConfigFile(t, f, err, nil), target: tg}
	b.ok(t, "issue", "read_only")

	doc, r := checkJSON(t, "--addr", b.addr, "--config", cfgPath, "--severity", "info")
	if r.code != exitFindings {
		t.Fatalf("exit %d: %+v (stderr %q)", r.code, doc, r.stderr)
	}
	stale := map[string]string{}
	for _, f := range doc.Findings {
		if f.Check == privcheck.CheckStale {
			stale[f.Role] = f.Severity + ": " + f.Message
		}
	}
	// read_only was just issued; updater never was, and the store keeps
	// ended leases only 24h (the default), so that is all it can say.
	if _, ok := stale["read_only"]; ok || len(stale) != 1 || !strings.HasPrefix(stale["updater"], "info: broker role issued no lease the store remembers") {
		t.Fatalf("stale findings %q", stale)
	}
}
