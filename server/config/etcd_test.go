package config

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/store/etcd"
)

// etcdYAML is validYAML with store.etcd in place of store.path; extra is
// indented under store.etcd.
func etcdYAML(extra string) string {
	return strings.Replace(validYAML, "  path: leases.db\n",
		"  etcd:\n    endpoints: [http://127.0.0.1:2379, http://127.0.0.2:2379]\n"+extra, 1)
}

func TestEtcdStoreDefaults(t *testing.T) {
	c, err := loadAndValidate(t, etcdYAML(""))
	if err != nil {
		t.Fatal(err)
	}
	e := c.Store.Etcd
	if e == nil || c.Store.Path != "" {
		t.Fatalf("store = %+v, want etcd and no path", c.Store)
	}
	if e.Prefix != etcd.DefaultPrefix || e.SessionTTL != etcd.DefaultSessionTTL || e.DialTimeout != etcd.DefaultDialTimeout {
		t.Errorf("defaults: prefix %q session_ttl %s dial_timeout %s", e.Prefix, e.SessionTTL, e.DialTimeout)
	}
	if len(e.Endpoints) != 2 || e.Endpoints[1] != "http://127.0.0.2:2379" {
		t.Errorf("endpoints = %v", e.Endpoints)
	}
	if c.Instance == "" {
		t.Error("instance has no default (the host name)")
	}
}

func TestEtcdStoreFullySet(t *testing.T) {
	path := writeConfig(t, strings.Replace(etcdYAML(`    prefix: /team-a/
    session_ttl: 3s
    dial_timeout: 2s
    tls: {ca_file: ca.pem, cert_file: client.pem, key_file: client-key.pem}
    username: credbroker
    password_file: etcd.password
`), "http://", "https://", 2)+"instance: broker-a\n")
	f, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := f.Validate()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(path)
	e := c.Store.Etcd
	want := EtcdTLS{CAFile: filepath.Join(dir, "ca.pem"), CertFile: filepath.Join(dir, "client.pem"), KeyFile: filepath.Join(dir, "client-key.pem")}
	if e.TLS != want {
		t.Errorf("tls = %+v, want %+v (resolved against the file's directory)", e.TLS, want)
	}
	if e.Prefix != "/team-a/" || e.SessionTTL != 3*time.Second || e.DialTimeout != 2*time.Second {
		t.Errorf("prefix %q session_ttl %s dial_timeout %s", e.Prefix, e.SessionTTL, e.DialTimeout)
	}
	if e.Username != "credbroker" || e.PasswordFile != filepath.Join(dir, "etcd.password") {
		t.Errorf("username %q password_file %q", e.Username, e.PasswordFile)
	}
	if c.Instance != "broker-a" {
		t.Errorf("instance = %q", c.Instance)
	}
}

func TestEtcdStoreErrorsNameTheirKey(t *testing.T) {
	cases := []struct {
		name, yaml, want string
	}{
		{"both stores", strings.Replace(etcdYAML(""), "store:\n", "store:\n  path: leases.db\n", 1), "store: set one of path"},
		{"neither", strings.Replace(validYAML, "  path: leases.db\n", "  tombstone_retention: 1h\n", 1), "store.path: required"},
		{"no endpoints", strings.Replace(validYAML, "  path: leases.db\n", "  etcd: {prefix: /x/}\n", 1), "store.etcd.endpoints: required"},
		{"bad endpoint", strings.Replace(etcdYAML(""), "http://127.0.0.2:2379", "127.0.0.2:2379", 1), "store.etcd.endpoints[1]: \"127.0.0.2:2379\" is not an etcd client URL"},
		{"endpoint with user", strings.Replace(etcdYAML(""), "http://127.0.0.2", "http://u:pw@127.0.0.2", 1), "store.etcd.endpoints[1]: must not hold credentials"},
		{"duplicate endpoint", strings.Replace(etcdYAML(""), "127.0.0.2", "127.0.0.1", 1), "store.etcd.endpoints[1]: \"http://127.0.0.1:2379\" is also store.etcd.endpoints[0]"},
		{"prefix without slash", etcdYAML("    prefix: /credbroker\n"), "store.etcd.prefix: \"/credbroker\" must end in \"/\""},
		{"session ttl too short", etcdYAML("    session_ttl: 1s\n"), "store.etcd.session_ttl: 1s is below the minimum 2s"},
		{"session ttl fractional", etcdYAML("    session_ttl: 2500ms\n"), "store.etcd.session_ttl: 2.5s is not whole seconds"},
		{"session ttl zero", etcdYAML("    session_ttl: 0s\n"), "store.etcd.session_ttl: 0s must be positive"},
		{"dial timeout", etcdYAML("    dial_timeout: soon\n"), "store.etcd.dial_timeout: \"soon\" is not a duration"},
		{"cert without key", strings.ReplaceAll(etcdYAML("    tls: {cert_file: c.pem}\n"), "http://", "https://"), "store.etcd.tls: set cert_file and key_file together"},
		{"tls over http", etcdYAML("    tls: {ca_file: ca.pem}\n"), "store.etcd.endpoints[0]: \"http://127.0.0.1:2379\" is plaintext"},
		{"username alone", etcdYAML("    username: credbroker\n"), "store.etcd.password_file: required with store.etcd.username"},
		{"password file alone", etcdYAML("    password_file: etcd.password\n"), "store.etcd.username: required with store.etcd.password_file"},
		{"unknown key", etcdYAML("    pasword_file: x\n"), "store.etcd.pasword_file: unknown key"},
		{"password inline", etcdYAML("    password: hunter2\n"), "store.etcd.password: unknown key"},
		{"instance", etcdYAML("") + "instance: \"broker a\"\n", "instance: \"broker a\" must match"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadAndValidate(t, tc.yaml)
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error %q echoes a password", err)
			}
		})
	}
}

func TestOpenTimeoutWithEtcdWarns(t *testing.T) {
	c, err := loadAndValidate(t, etcdYAML("")+"")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range c.Warnings {
		if strings.Contains(w, "open_timeout") {
			t.Fatalf("warning %q without store.open_timeout", w)
		}
	}
	c, err = loadAndValidate(t, strings.Replace(etcdYAML(""), "store:\n", "store:\n  open_timeout: 2s\n", 1))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(c.Warnings, "\n"), "store.open_timeout: applies to a bbolt file only") {
		t.Fatalf("warnings %q lack the open_timeout one", c.Warnings)
	}
}
