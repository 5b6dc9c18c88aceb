package config_test

import (
	"bytes"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server/config"
)

var hexDigest = regexp.MustCompile(`^[0-9a-f]{64}$`)

const seedConfig = `
listen: 127.0.0.1:7450
store:
  path: /nonexistent/credbroker/leases.db
targets:
  - name: main
    url: postgres://broker_admin@127.0.0.1:5432/app
    password_env: CREDBROKER_FUZZ_PASSWORD
roles:
  - name: read_only
    target: main
    proxy_role: read_only_role
    default_ttl: 15m
    max_ttl: 1h
    allowed: ["svc-*", "spiffe://prod/ns/*/sa/reader"]
    max_active_leases: 10
tokens:
  - {identity: batch, sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef}
admins: [ops]
quotas: {max_active_per_identity: 5, issue_rate_per_identity: 30/m, issue_burst: 3}
`

// FuzzConfig feeds the configuration parser and validator arbitrary YAML.
// The seed corpus is testdata/fuzz/FuzzConfig (example configurations and
// the injection corpus in every identifier); `go test` runs the seeds, and
//
//	go test -run '^$' -fuzz FuzzConfig -fuzztime 5m ./server/config
//
// searches beyond them. Nothing here needs a database, and the package
// starts none.
func FuzzConfig(f *testing.F) {
	f.Setenv("CREDBROKER_FUZZ_PASSWORD", "fuzz-admin-password")
	f.Add([]byte(seedConfig))
	f.Add([]byte(strings.Replace(seedConfig, "broker_admin@", "broker_admin:hunter2-secret@", 1)))
	f.Add([]byte(strings.Replace(seedConfig, "read_only_role", `"x'; DROP ROLE postgres; --"`, 1)))
	f.Add([]byte("roles: [{name: 'a\x00b'}]\n"))
	f.Add([]byte("a: &a [*a]\n"))

	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := config.Parse(data)
		if err != nil {
			return
		}
		cfg, err := file.Validate()
		if err != nil {
			checkNoSecretEchoed(t, data, err.Error())
			return
		}
		for _, r := range cfg.Roles {
			if !broker.RoleNamePattern.MatchString(r.Name) {
				t.Fatalf("role name %q accepted", r.Name)
			}
			if err := postgres.ValidIdentifier(r.ProxyRole); err != nil {
				t.Fatalf("proxy role %q accepted: %v", r.ProxyRole, err)
			}
		}
		for _, tg := range cfg.Targets {
			if err := postgres.ValidIdentifier(tg.Database); err != nil {
				t.Fatalf("database %q accepted: %v", tg.Database, err)
			}
			if err := postgres.ValidIdentifier(tg.MarkerRole); err != nil {
				t.Fatalf("marker role %q accepted: %v", tg.MarkerRole, err)
			}
			if u, err := url.Parse(tg.URL); err != nil || u.User == nil {
				t.Fatalf("target URL %q accepted", tg.URL)
			} else if _, has := u.User.Password(); has {
				t.Fatal("a target URL with a password was accepted")
			}
		}
		for _, tok := range cfg.Security.Tokens {
			if !hexDigest.MatchString(tok.SHA256) {
				t.Fatalf("token hash %q accepted", tok.SHA256)
			}
		}
	})
}

// checkNoSecretEchoed looks for the secrets an operator may have written
// into the file by mistake and fails if the error repeats one.
func checkNoSecretEchoed(t *testing.T, data []byte, msg string) {
	t.Helper()
	var raw struct {
		Targets []struct {
			URL string `yaml:"url"`
		} `yaml:"targets"`
		Tokens []struct {
			SHA256 string `yaml:"sha256"`
		} `yaml:"tokens"`
	}
	if yaml.Unmarshal(data, &raw) != nil {
		return
	}
	for _, tg := range raw.Targets {
		if u, err := url.Parse(tg.URL); err == nil && u.User != nil {
			// Only a password written once in the file counts: the same
			// string elsewhere (a role name) may rightly be quoted.
			if pw, ok := u.User.Password(); ok && len(pw) >= 8 && bytes.Count(data, []byte(pw)) == 1 && strings.Contains(msg, pw) {
				t.Fatalf("error echoes the URL's password %q:\n%s", pw, msg)
			}
		}
	}
	for _, tok := range raw.Tokens {
		if len(tok.SHA256) >= 8 && !hexDigest.MatchString(tok.SHA256) && bytes.Count(data, []byte(tok.SHA256)) == 1 && strings.Contains(msg, tok.SHA256) {
			t.Fatalf("error echoes the token written as sha256 %q:\n%s", tok.SHA256, msg)
		}
	}
}
