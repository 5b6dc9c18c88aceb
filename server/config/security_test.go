package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/server"
)

// writeTLSFiles writes a self-signed certificate and its key into dir as
// server.crt, server.key (0600) and ca.crt.
func writeTLSFiles(t *testing.T, dir string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "brokerd"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	for name, data := range map[string][]byte{
		"server.crt": certPEM,
		"server.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}),
		"ca.crt":     certPEM,
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// securityConfig writes validYAML plus extra into a directory holding TLS
// files and an HMAC key, and validates it.
func securityConfig(t *testing.T, extra string) (*Config, error) {
	t.Helper()
	path := writeConfig(t, validYAML+extra)
	dir := filepath.Dir(path)
	writeTLSFiles(t, dir)
	if err := os.WriteFile(filepath.Join(dir, "audit.key"), []byte("0123456789abcdef0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Load(path)
	if err != nil {
		return nil, err
	}
	return f.Validate()
}

func TestSecurityKeys(t *testing.T) {
	hash := server.TokenHash("a-token")
	c, err := securityConfig(t, `
tls:
  cert_file: server.crt
  key_file: server.key
  client_ca_file: ca.crt
tokens:
  - {identity: batch-job, sha256: `+hash+`}
admins: [ops, "spiffe://prod/ns/ops/sa/admin"]
quotas:
  max_active_per_identity: 20
  issue_rate_per_identity: 30/m
audit:
  path: audit/credbroker.audit
  hmac_key_file: audit.key
  required: true
`)
	if err != nil {
		t.Fatal(err)
	}
	s := c.Security
	if !s.Enabled() || s.TLS == nil || !filepath.IsAbs(s.TLS.CertFile) || !strings.HasSuffix(s.TLS.ClientCAFile, "ca.crt") {
		t.Errorf("tls: %+v", s.TLS)
	}
	if len(s.Tokens) != 1 || s.Tokens[0] != (Token{Identity: "batch-job", SHA256: hash}) {
		t.Errorf("tokens: %+v", s.Tokens)
	}
	if !slices.Equal(s.Admins, []string{"ops", "spiffe://prod/ns/ops/sa/admin"}) {
		t.Errorf("admins: %v", s.Admins)
	}
	if s.Quotas.IdentityMaxActive != 20 || s.Quotas.IssueRate != 0.5 || s.Quotas.IssueBurst != 30 {
		t.Errorf("quotas: %+v (want 20 active, 0.5/s, burst 30)", s.Quotas)
	}
	if !strings.HasSuffix(s.Audit.Path, "audit/credbroker.audit") || !strings.HasSuffix(s.Audit.HMACKeyFile, "/audit.key") {
		t.Errorf("audit: path %q, key file %q", s.Audit.Path, s.Audit.HMACKeyFile)
	}
	if !s.Audit.Required {
		t.Error("audit.required not read")
	}
	// Both roles have no allowed list: nobody can issue them, and that is
	// worth a warning.
	if !slices.ContainsFunc(c.Warnings, func(w string) bool { return strings.Contains(w, "roles[0].allowed: empty") }) {
		t.Errorf("no warning about roles without allowed: %v", c.Warnings)
	}

	// Per-role keys.
	c, err = securityConfig(t, "tokens: [{identity: a, sha256: "+hash+"}]\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Security.TLS != nil || !c.Security.Enabled() {
		t.Errorf("tokens alone: %+v", c.Security)
	}
	text := strings.Replace(validYAML, "    max_ttl: 1h\n", "    max_ttl: 1h\n    allowed: [\"svc-*\", \"spiffe://prod/ns/*/sa/reader\"]\n    max_active_leases: 7\n", 1)
	c, err = loadAndValidate(t, text+"tokens: [{identity: a, sha256: "+hash+"}]\n")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Security.Allowed["read_only"]; !slices.Equal(got, []string{"svc-*", "spiffe://prod/ns/*/sa/reader"}) {
		t.Errorf("allowed: %v", got)
	}
	if c.Security.Quotas.RoleMaxActive["read_only"] != 7 {
		t.Errorf("max_active_leases: %v", c.Security.Quotas.RoleMaxActive)
	}
}

func TestSecurityErrors(t *testing.T) {
	const plainToken = "my-secret-token-value"
	for _, tc := range []struct {
		name  string
		extra string
		want  []string
	}{
		{"token stored in clear", "tokens: [{identity: svc, sha256: " + plainToken + "}]\n",
			[]string{"tokens[0].sha256: must be 64 lower-case hex digits, the SHA-256 of the token"}},
		{"token without hash", "tokens: [{identity: svc}]\n", []string{"tokens[0].sha256: required"}},
		{"same token twice", "tokens: [{identity: a, sha256: " + server.TokenHash("x") + "}, {identity: b, sha256: " + server.TokenHash("x") + "}]\n",
			[]string{"tokens[1].sha256: the same token as tokens[0]"}},
		{"bad identity", "tokens: [{identity: \"svc\\nadmin\", sha256: " + server.TokenHash("x") + "}]\nadmins: [\"\", \" ops\"]\n",
			[]string{"tokens[0].identity: identity contains control characters", "admins[0]: identity is empty", "admins[1]: identity starts or ends with white space"}},
		{"tls without a way to authenticate", "tls: {cert_file: server.crt, key_file: server.key}\n",
			[]string{"tls: no way to authenticate callers"}},
		{"tls files missing", "tls: {cert_file: nope.crt, client_ca_file: ca.crt}\n",
			[]string{"tls.cert_file: stat ", "tls.key_file: required"}},
		{"bad rate", "quotas: {issue_rate_per_identity: fast, issue_burst: 0}\n",
			[]string{`quotas.issue_rate_per_identity: "fast" is not a rate`, "quotas.issue_burst: 0 must be positive"}},
		{"burst without rate", "quotas: {issue_burst: 3, max_active_per_identity: -1}\n",
			[]string{"quotas.issue_burst: needs quotas.issue_rate_per_identity", "quotas.max_active_per_identity: -1 must be positive"}},
		{"hmac key without path", "audit: {hmac_key_file: server.crt}\n", []string{"audit.hmac_key_file: needs audit.path"}},
		{"required without path", "audit: {required: true}\n", []string{"audit.required: needs audit.path"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := securityConfig(t, tc.extra)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if strings.Contains(err.Error(), plainToken) {
				t.Errorf("the error echoes a token pasted in clear:\n%v", err)
			}
		})
	}
}

func TestSecurityRoleKeyErrors(t *testing.T) {
	text := strings.Replace(validYAML, "    max_ttl: 1h\n", "    max_ttl: 1h\n    allowed: [\"svc-[\", \"ok\"]\n    max_active_leases: 0\n", 1)
	_, err := loadAndValidate(t, text+"tokens: [{identity: a, sha256: "+server.TokenHash("x")+"}]\n")
	if err == nil {
		t.Fatal("accepted")
	}
	for _, w := range []string{`roles[0].allowed[0]: pattern "svc-[": syntax error in pattern`, "roles[0].max_active_leases: 0 must be positive"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q:\n%v", w, err)
		}
	}
}

func TestListenBeyondLoopbackNeedsTLS(t *testing.T) {
	text := strings.Replace(validYAML, "listen: 127.0.0.1:7450", "listen: 0.0.0.0:7450", 1)
	if _, err := securityConfig(t, "tokens: [{identity: a, sha256: "+server.TokenHash("x")+"}]\n"); err != nil {
		t.Fatal(err)
	}
	path := writeConfig(t, text+"tokens: [{identity: a, sha256: "+server.TokenHash("x")+"}]\n")
	f, _ := Load(path)
	if _, err := f.Validate(); err == nil || !strings.Contains(err.Error(), "plaintext gRPC is only allowed on loopback") {
		t.Errorf("0.0.0.0 with tokens but no tls: %v", err)
	}
	if _, err := securityConfig(t, "tls: {cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt}\n"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeTLSFiles(t, dir)
	pw := filepath.Join(dir, "main.password")
	os.WriteFile(pw, []byte("pw\n"), 0o600)
	text = strings.Replace(text, "password_file: main.password", "password_file: "+pw, 1)
	text = strings.Replace(text, "path: leases.db", "path: "+filepath.Join(dir, "leases.db"), 1)
	text += "tls: {cert_file: " + filepath.Join(dir, "server.crt") + ", key_file: " + filepath.Join(dir, "server.key") + ", client_ca_file: " + filepath.Join(dir, "ca.crt") + "}\n"
	f, err := Parse([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Validate(); err != nil {
		t.Errorf("0.0.0.0 with tls: %v", err)
	}
}

func TestConfigRejectsInvalidUTF8(t *testing.T) {
	text := strings.Replace(validYAML, "name: read_only", "name: read_\xc3\x28only", 1)
	if _, err := Parse([]byte(text)); err == nil {
		t.Fatal("invalid UTF-8 accepted")
	}
}
