package metrics_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"github.com/credbroker/credbroker/server/metrics"
)

// examplesDir is the repository's examples/, from this package's directory.
var examplesDir = filepath.Join("..", "..", "examples")

// metricRef finds metric names in PromQL: ours and the gRPC middleware's.
var metricRef = regexp.MustCompile(`\b(?:credbroker|grpc_server)_[a-z0-9_]+\b`)

// descName is the fqName in a Desc's String (client_golang has no getter).
var descName = regexp.MustCompile(`fqName: "([^"]+)"`)

// exported is every metric family brokerd's registry can serve, from the
// collectors' descriptions, so a vector with no series yet counts too.
func exported(t *testing.T) map[string]bool {
	t.Helper()
	m := metrics.New("test", []string{"app"})
	m.WatchTargets(func() map[string]bool { return map[string]bool{"main": true} })
	m.WatchAudit(func() bool { return true })
	ch := make(chan *prometheus.Desc)
	go func() {
		m.Registry().Describe(ch)
		close(ch)
	}()
	names := map[string]bool{}
	for d := range ch {
		match := descName.FindStringSubmatch(d.String())
		if match == nil {
			t.Fatalf("no fqName in %s", d)
		}
		names[match[1]] = true
	}
	return names
}

// known reports whether name is an exported family or one of the series a
// histogram (or summary) family adds.
func known(names map[string]bool, name string) bool {
	if names[name] {
		return true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok && names[base] {
			return true
		}
	}
	return false
}

func TestExamplesReferenceOnlyRealMetrics(t *testing.T) {
	names := exported(t)

	// The alerts: every rule's expression, and the alerts the file
	// promises by name.
	raw, err := os.ReadFile(filepath.Join(examplesDir, "prometheus", "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(raw, &rules); err != nil {
		t.Fatalf("alerts.yaml: %v", err)
	}
	exprs := map[string][]string{}
	var alerts []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			exprs["alerts.yaml "+r.Alert] = append(exprs["alerts.yaml "+r.Alert], r.Expr)
		}
	}
	for _, want := range []string{"CredbrokerRevocationsFailing", "CredbrokerExpiryLagging",
		"CredbrokerTargetUnreachable", "CredbrokerNoLeader", "CredbrokerAuditLogNotWritable", "CredbrokerConfigReloadFailed"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("alerts.yaml has no alert %s (has %v)", want, alerts)
		}
	}

	// The dashboard: every panel's queries and the template variables'.
	raw, err = os.ReadFile(filepath.Join(examplesDir, "grafana", "credbroker.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("credbroker.json: %v", err)
	}
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("credbroker.json panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			exprs["credbroker.json panel "+p.Title] = append(exprs["credbroker.json panel "+p.Title], q.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		if v.Definition != "" {
			exprs["credbroker.json variable "+v.Name] = append(exprs["credbroker.json variable "+v.Name], v.Definition)
		}
	}

	referenced := map[string]bool{}
	for where, list := range exprs {
		refs := 0
		for _, e := range list {
			for _, name := range metricRef.FindAllString(e, -1) {
				refs++
				referenced[name] = true
				if !known(names, name) {
					t.Errorf("%s: %s is not a metric brokerd exports: %q", where, name, e)
				}
			}
		}
		if refs == 0 {
			t.Errorf("%s names no credbroker metric", where)
		}
	}
	// The dashboard covers what the brief asked of it.
	for _, want := range []string{"credbroker_leases", "credbroker_issued_total", "credbroker_renewed_total",
		"credbroker_revoked_total", "credbroker_expiry_lag_seconds_bucket", "credbroker_revoke_failures_total",
		"credbroker_store_commit_duration_seconds_bucket", "credbroker_keepalive_streams", "credbroker_is_leader"} {
		if !referenced[want] {
			t.Errorf("no example uses %s", want)
		}
	}
}
