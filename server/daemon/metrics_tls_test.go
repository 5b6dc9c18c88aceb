package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/internal/testpki"
)

// TestMetricsServeHTTPSWithTheGRPCCertificate: with tls configured,
// metrics.listen serves HTTPS with the gRPC listener's certificate
// settings, through the same CertReloader: the client CA is required, a
// plaintext request gets no metrics, and a certificate replaced on disk is
// served from the next handshake on.
func TestMetricsServeHTTPSWithTheGRPCCertificate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	dir := t.TempDir()
	ca := testpki.NewCA(t, "metrics-ca")
	caFile := ca.WriteCA(t, dir, "ca.crt")
	certFile, keyFile := ca.WriteLeaf(t, dir, "server", testpki.Leaf{CN: "brokerd-one", Server: true})
	scraperCert, scraperKey := ca.Issue(t, testpki.Leaf{CN: "prometheus"})
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := parseConfig(t, fmt.Sprintf(`listen: 127.0.0.1:0
metrics: {listen: 127.0.0.1:0}
tls: {cert_file: %q, key_file: %q, client_ca_file: %q}
store: {path: %q}
targets:
  - {name: main, url: %q, password_file: %q, marker_role: %s, connect_timeout: 5s}
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m, allowed: [prometheus]}
`, certFile, keyFile, caFile, filepath.Join(dir, "leases.db"), tg.AdminURL, pw, tg.MarkerRole, tg.ProxyRoles["read_only"]))
	var logs syncbuf.Buffer
	opts := testOptions()
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	d, err := Start(ctx, cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	addr := d.MetricsAddr().String()

	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.PEM)
	clientCert, err := tls.X509KeyPair(scraperCert, scraperKey)
	if err != nil {
		t.Fatal(err)
	}
	// get scrapes path over a new connection each time (so each request is
	// a new handshake) and returns the status, the body and the CN of the
	// certificate the server presented.
	get := func(t *testing.T, scheme, path string, certs []tls.Certificate) (int, string, string, error) {
		t.Helper()
		tr := &http.Transport{DisableKeepAlives: true,
			TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: certs, ServerName: "127.0.0.1"}}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(scheme + "://" + addr + path)
		if err != nil {
			return 0, "", "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		cn := ""
		if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
			cn = resp.TLS.PeerCertificates[0].Subject.CommonName
		}
		return resp.StatusCode, string(body), cn, nil
	}
	withCert := []tls.Certificate{clientCert}

	code, body, cn, err := get(t, "https", "/metrics", withCert)
	if err != nil || code != http.StatusOK || !strings.Contains(body, "credbroker_build_info{version=") {
		t.Fatalf("HTTPS /metrics with a client certificate: %d %v %.200q", code, err, body)
	}
	if cn != "brokerd-one" {
		t.Errorf("served certificate CN %q, want brokerd-one (the gRPC tls.cert_file)", cn)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body, _, err := get(t, "https", path, withCert); err != nil || code != http.StatusOK {
			t.Errorf("HTTPS %s: %d %v %q", path, code, err, body)
		}
	}

	// client_ca_file makes a client certificate required, as for gRPC.
	if code, body, _, err := get(t, "https", "/metrics", nil); err == nil {
		t.Errorf("HTTPS /metrics without a client certificate answered %d %.100q", code, body)
	}
	// Plaintext is not served, and the HTTP server's complaint is in
	// brokerd's log (http.Server.ErrorLog), not on the process's stderr.
	if code, body, _, err := get(t, "http", "/metrics", nil); err == nil && (code == http.StatusOK || strings.Contains(body, "credbroker_")) {
		t.Errorf("plain HTTP /metrics answered %d with metrics", code)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "TLS handshake error"); {
		if time.Now().After(deadline) {
			t.Fatalf("no TLS handshake error in brokerd's log after a plaintext request; log:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
	if !strings.Contains(logs.String(), "level=WARN msg=\"metrics listener: http: TLS handshake error") {
		t.Errorf("the handshake error is not logged as a metrics listener warning; log:\n%s", logs.String())
	}

	// A certificate replaced on disk is served from the next handshake.
	newCert, newKey := ca.Issue(t, testpki.Leaf{CN: "brokerd-two", Server: true})
	later := time.Now().Add(time.Minute)
	for f, data := range map[string][]byte{certFile: newCert, keyFile: newKey} {
		if err := os.WriteFile(f, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(f, later, later); err != nil { // a new stamp even on a coarse clock
			t.Fatal(err)
		}
	}
	code, _, cn, err = get(t, "https", "/metrics", withCert)
	if err != nil || code != http.StatusOK || cn != "brokerd-two" {
		t.Errorf("after replacing the certificate: %d %v, served CN %q, want brokerd-two", code, err, cn)
	}
}
