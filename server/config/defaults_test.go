package config

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// readmeDefault is a row of README.md's configuration table whose default
// column is a value: | `key` | `default` | meaning |.
var readmeDefault = regexp.MustCompile("(?m)^\\| `([a-z_.\\[\\]]+)` \\| `([^`]+)` \\|")

// sameDefault reports whether the README's text says the value got:
// durations compare as durations (the README writes 24h, Go 24h0m0s).
func sameDefault(text string, got any) bool {
	if d, ok := got.(time.Duration); ok {
		want, err := time.ParseDuration(text)
		return err == nil && want == d
	}
	return fmt.Sprint(got) == text
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
	ce, err := loadAndValidate(t, etcdYAML(""))
	if err != nil {
		t.Fatal(err)
	}
	tg := c.Targets[0]
	effective := map[string]any{
		"store.etcd.prefix":            ce.Store.Etcd.Prefix,
		"store.etcd.session_ttl":       ce.Store.Etcd.SessionTTL,
		"store.etcd.dial_timeout":      ce.Store.Etcd.DialTimeout,
		"listen":                       c.Listen,
		"store.open_timeout":           c.Store.OpenTimeout,
		"store.tombstone_retention":    c.Store.TombstoneRetention,
		"targets[].marker_role":        tg.MarkerRole,
		"targets[].max_conns":          tg.MaxConns,
		"targets[].connect_timeout":    tg.ConnectTimeout,
		"targets[].scram_iterations":   tg.ScramIterations,
		"expiry.revoke_concurrency":    c.Expiry.RevokeConcurrency,
		"expiry.revoke_rate":           c.Expiry.RevokeRate,
		"expiry.revoke_retries":        c.Expiry.RevokeRetries,
		"expiry.valid_until_grace":     c.Expiry.ValidUntilGrace,
		"expiry.retry_base_delay":      c.Expiry.RetryBaseDelay,
		"expiry.retry_max_delay":       c.Expiry.RetryMaxDelay,
		"expiry.failed_retry_interval": c.Expiry.FailedRetryInterval,
		"reconcile_interval":           c.ReconcileInterval,
		"disconnect_grace":             c.DisconnectGrace,
		"shutdown_timeout":             c.ShutdownTimeout,
		"log.level":                    strings.ToLower(c.Log.Level.String()),
		"log.format":                   c.Log.Format,
		"dsn_sslmode":                  c.DSNSSLMode,
		"activity.sample_interval":     c.Activity.SampleInterval,
		"vault_api.mount":              c.VaultAPI.Mount,
	}
	stated := map[string]bool{}
	for _, m := range readmeDefault.FindAllStringSubmatch(string(raw), -1) {
		key, want := m[1], m[2]
		stated[key] = true
		got, ok := effective[key]
		switch {
		case !ok:
			t.Errorf("README.md states default %q for %s, which this test does not check: add it to effective", want, key)
		case !sameDefault(want, got):
			t.Errorf("README.md says %s defaults to %q; Validate fills in %v", key, want, got)
		}
	}
	for key, got := range effective {
		if !stated[key] {
			t.Errorf("README.md's configuration table has no default for %s (it is %v)", key, got)
		}
	}
}
