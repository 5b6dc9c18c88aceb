package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// pemCA makes a CA and signs leaf certificates, writing PEM files.
type pemCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newPEMCA(t *testing.T, dir string) *pemCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	writePEM(t, filepath.Join(dir, "ca.crt"), "CERTIFICATE", der)
	return &pemCA{cert: cert, key: key}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// leaf writes NAME.crt and NAME.key into dir.
func (ca *pemCA) leaf(t *testing.T, dir, name, cn string, server bool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	writePEM(t, filepath.Join(dir, name+".crt"), "CERTIFICATE", der)
	writePEM(t, filepath.Join(dir, name+".key"), "EC PRIVATE KEY", kder)
}

// TestCLIAgainstTLSAndTokenBroker configures a broker with mutual TLS,
// a bearer token, an allow-list, an admin and an audit log, builds and
// serves it as brokerd does (daemon.Start), and
// drives it with brokerctl's --tls-* and --token-file flags.
func TestCLIAgainstTLSAndTokenBroker(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	dir := t.TempDir()
	ca := newPEMCA(t, dir)
	ca.leaf(t, dir, "server", "brokerd", true)
	ca.leaf(t, dir, "svc", "svc", false)
	const adminToken = "ops-token-6b1f0c9e2d7a4e5f8a3b"
	tokenFile := filepath.Join(dir, "ops.token")
	os.WriteFile(tokenFile, []byte(adminToken+"\n"), 0o600)
	pw := filepath.Join(dir, "admin.password")
	os.WriteFile(pw, []byte(tg.AdminPassword), 0o600)
	auditPath := filepath.Join(dir, "audit", "audit.log")

	yml := fmt.Sprintf(`listen: 0.0.0.0:7450
store: {path: %q}
targets:
  - {name: main, url: %q, password_file: %q, marker_role: %s}
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 15m, max_ttl: 1h, allowed: [svc]}
dsn_sslmode: disable
tls: {cert_file: %q, key_file: %q, client_ca_file: %q}
tokens: [{identity: ops, sha256: %s}]
admins: [ops]
audit: {path: %q}
`, filepath.Join(dir, "leases.db"), tg.AdminURL, pw, tg.MarkerRole, tg.ProxyRoles["read_only"],
		filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"), filepath.Join(dir, "ca.crt"),
		server.TokenHash(adminToken), auditPath)
	f, err := config.Parse([]byte(yml))
	addr := serveConfigFile(t, f, err, nil)

	tlsFlags := []string{"--addr", addr, "--tls-ca", filepath.Join(dir, "ca.crt")}
	svc := append(tlsFlags, "--tls-cert", filepath.Join(dir, "svc.crt"), "--tls-key", filepath.Join(dir, "svc.key"))

	r := ctl(t, append(svc, "--json", "issue", "read_only")...)
	if r.code != 0 {
		t.Fatalf("issue over mutual TLS: exit %d: %s", r.code, r.stderr)
	}
	var issued struct {
		Lease struct{ ID, Client string }
	}
	if err := json.Unmarshal([]byte(r.stdout), &issued); err != nil || issued.Lease.Client != "svc" {
		t.Fatalf("issued lease: %v, %s", err, r.stdout)
	}

	// The admin token (the broker verifies no certificate for it).
	r = ctl(t, append(tlsFlags, "--token-file", tokenFile, "leases")...)
	if r.code != 0 || !strings.Contains(r.stdout, issued.Lease.ID) {
		t.Fatalf("leases as the admin token: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// The service is no admin.
	r = ctl(t, append(svc, "leases")...)
	if r.code != 1 || !strings.Contains(r.stderr, "PermissionDenied") {
		t.Errorf("leases as svc: exit %d, %s", r.code, r.stderr)
	}
	// Plaintext to a TLS broker does not get through.
	r = ctl(t, "--addr", addr, "roles")
	if r.code != 1 || !strings.Contains(r.stderr, "Unavailable") {
		t.Errorf("plaintext call: exit %d, %s", r.code, r.stderr)
	}
	// Without --tls-ca, a remote address is refused before dialling.
	r = ctl(t, "--addr", "192.0.2.1:7450", "--token-file", tokenFile, "roles")
	if r.code != 2 || !strings.Contains(r.stderr, "without --tls-ca") {
		t.Errorf("remote plaintext: exit %d, %s", r.code, r.stderr)
	}

	// The audit trail verifies and counts the issue and the denial.
	r = ctl(t, "audit", "verify", auditPath)
	if r.code != 0 {
		t.Fatalf("audit verify: exit %d: %s", r.code, r.stderr)
	}
	r = ctl(t, "--json", "audit", "usage", auditPath)
	var usage struct {
		Usage []struct {
			Role, Identity string
			Issued, Denied int
		}
	}
	if err := json.Unmarshal([]byte(r.stdout), &usage); err != nil {
		t.Fatalf("usage: %v: %s", err, r.stdout)
	}
	var issuedSvc, deniedSvc int
	for _, u := range usage.Usage {
		if u.Identity == "svc" {
			issuedSvc += u.Issued
			deniedSvc += u.Denied
		}
	}
	if issuedSvc != 1 || deniedSvc != 1 {
		t.Errorf("usage of svc: issued %d, denied %d; want 1 and 1: %s", issuedSvc, deniedSvc, r.stdout)
	}
	data, _ := os.ReadFile(auditPath)
	if strings.Contains(string(data), adminToken) {
		t.Error("the admin token is in the audit log")
	}
}
