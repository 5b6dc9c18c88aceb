package config

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// readmeDefault is a row of README.md's configuration table whose default
// column is a value: | `key` | `default` | meaning |.
var readmeDefault = regexp.MustCompile("(?m)^\\| `([a-z_.\\[\\]]+)` \\| `([^`]+)` \\|")

// shortDuration writes d as the README does: 24h, 5m, 15s, 1h30m.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// TestREADMEDefaults compares the default README.md states for each key
// with what Validate fills in for a file that leaves the key out, so the
// two cannot drift: a default changed in its owning package fails here
// until the README says so too.
func TestREADMEDefaults(t *testing.T) {
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	c, err := loadAndValidate(t, `
store: {path: leases.db}
targets:
  - {name: main, url: "postgres://broker_admin@127.0.0.1:5432/app", password_file: main.password}
roles:
  - {name: read_only, target: main, proxy_role: read_only_role, default_ttl: 15m, max_ttl: 1h}
`)
	if err != nil {
		t.Fatal(err)
	}
	tg := c.Targets[0]
	effective := map[string]string{
		"listen":                       c.Listen,
		"store.open_timeout":           shortDuration(c.Store.OpenTimeout),
		"store.tombstone_retention":    shortDuration(c.Store.TombstoneRetention),
		"targets[].marker_role":        tg.MarkerRole,
		"targets[].max_conns":          strconv.Itoa(tg.MaxConns),
		"targets[].connect_timeout":    shortDuration(tg.ConnectTimeout),
		"expiry.revoke_concurrency":    strconv.Itoa(c.Expiry.RevokeConcurrency),
		"expiry.revoke_rate":           fmt.Sprint(c.Expiry.RevokeRate),
		"expiry.revoke_retries":        strconv.Itoa(c.Expiry.RevokeRetries),
		"expiry.valid_until_grace":     shortDuration(c.Expiry.ValidUntilGrace),
		"expiry.retry_base_delay":      shortDuration(c.Expiry.RetryBaseDelay),
		"expiry.retry_max_delay":       shortDuration(c.Expiry.RetryMaxDelay),
		"expiry.failed_retry_interval": shortDuration(c.Expiry.FailedRetryInterval),
		"reconcile_interval":           shortDuration(c.ReconcileInterval),
		"disconnect_grace":             shortDuration(c.DisconnectGrace),
		"shutdown_timeout":             shortDuration(c.ShutdownTimeout),
		"log.level":                    strings.ToLower(c.Log.Level.String()),
		"log.format":                   c.Log.Format,
		"dsn_sslmode":                  c.DSNSSLMode,
	}
	stated := map[string]bool{}
	for _, m := range readmeDefault.FindAllStringSubmatch(string(raw), -1) {
		key, want := m[1], m[2]
		stated[key] = true
		got, ok := effective[key]
		switch {
		case !ok:
			t.Errorf("README.md states default %q for %s, which this test does not check: add it to effective", want, key)
		case got != want:
			t.Errorf("README.md says %s defaults to %q; Validate fills in %q", key, want, got)
		}
	}
	for key, got := range effective {
		if !stated[key] {
			t.Errorf("README.md's configuration table has no default for %s (it is %q)", key, got)
		}
	}
}
