package daemon

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/fakeclock"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestActivityMetricsAndUnusedRevocation starts a broker through Start
// with activity sampling and revoke_unused_after, opens a session with an
// issued credential, samples, and checks the usage metrics per role
// (exact values, no lease id, username or identity as a label), then lets
// revoke_unused_after pass and checks that the never-connected lease of
// that role, and only it, is revoked and counted with reason unused.
func TestActivityMetricsAndUnusedRevocation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	ro := tg.ProxyRoles["read_only"]
	cfg := metricsConfig(t, tg, tg.AdminURL, fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1h, max_ttl: 2h, revoke_unused_after: 10m}
  - {name: other, target: main, proxy_role: %s, default_ttl: 1h, max_ttl: 2h}
activity: {sample_interval: 5m}
`, ro, ro))
	opts := testOptions()
	// VALID UNTIL is checked against PostgreSQL's clock: start at now.
	clock := fakeclock.New(time.Now().Truncate(time.Second))
	opts.Clock = clock
	d, err := Start(ctx, cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	b := d.Broker()

	const identity = "svc-usage-3"
	issue := func(role string) (broker.Lease, broker.Credential) {
		t.Helper()
		l, c, err := b.Issue(ctx, broker.IssueRequest{Role: role, Client: identity})
		if err != nil {
			t.Fatal(err)
		}
		return l, c
	}
	used, cred := issue("read_only")
	unused, _ := issue("read_only")
	other, _ := issue("other")

	pc, err := pgx.ParseConfig(tg.URL(cred.Username, cred.Password))
	if err != nil {
		t.Fatal(err)
	}
	pc.RuntimeParams["application_name"] = "usage-test"
	conn, err := pgx.ConnectConfig(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	conn2, err := pgx.ConnectConfig(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close(context.Background())

	// The loop samples every 5 minutes of the fake clock, which has not
	// moved: this sample is the first.
	if _, err := b.SampleActivity(ctx); err != nil {
		t.Fatal(err)
	}
	first := scrapeMetrics(t, d)
	want := map[string]float64{
		`credbroker_lease_sessions{role="read_only"}`:                  2,
		`credbroker_lease_sessions{role="other"}`:                      0,
		`credbroker_leases_never_used{role="read_only"}`:               1,
		`credbroker_leases_never_used{role="other"}`:                   1,
		`credbroker_revoked_total{reason="unused",role="read_only"}`:   0,
		`credbroker_activity_samples_total{result="ok",target="main"}`: 1,
	}
	for series, w := range want {
		if got, ok := first[series]; !ok || got != w {
			t.Errorf("after the first sample: %s = %v (exported: %t), want %v", series, got, ok, w)
		}
	}
	if l, _ := b.Lookup(ctx, used.ID); l.Usage.Sessions != 2 || l.Usage.ApplicationName != "usage-test" {
		t.Errorf("usage of the used lease: %+v", l.Usage)
	}

	// Ten minutes on, the never-connected read_only lease goes; the
	// other role has no revoke_unused_after. The loop samples on this
	// move too (at 5 and 10 minutes): each revocation is counted once
	// whichever sample made it.
	clock.Advance(10 * time.Minute)
	if _, err := b.SampleActivity(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := b.Lookup(ctx, unused.ID)
	if err != nil || l.State != broker.StateRevoked {
		t.Fatalf("never-connected lease after 10 minutes: %s, %v; want revoked", l.State, err)
	}
	for _, id := range []string{used.ID, other.ID} {
		if l, _ := b.Lookup(ctx, id); l.State != broker.StateActive {
			t.Errorf("lease %s is %s, want active", id, l.State)
		}
	}
	after := scrapeMetrics(t, d)
	want = map[string]float64{
		`credbroker_lease_sessions{role="read_only"}`:                2,
		`credbroker_leases_never_used{role="read_only"}`:             0,
		`credbroker_leases_never_used{role="other"}`:                 1,
		`credbroker_revoked_total{reason="unused",role="read_only"}`: 1,
		`credbroker_revoked_total{reason="unused",role="other"}`:     0,
		`credbroker_leases{role="read_only",state="active"}`:         1,
	}
	for series, w := range want {
		if got, ok := after[series]; !ok || got != w {
			t.Errorf("after revoke_unused_after: %s = %v (exported: %t), want %v", series, got, ok, w)
		}
	}
	values := after.labelValues()
	for _, secret := range []string{used.ID, unused.ID, other.ID, used.Username, unused.Username, other.Username, identity, "usage-test"} {
		if values[secret] {
			t.Errorf("a label value is a lease id, username, identity or application name: %q", secret)
		}
	}
}
