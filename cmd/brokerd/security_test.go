package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/internal/testpki"
	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server"
)

type tokenCreds string

func (c tokenCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(c)}, nil
}
func (tokenCreds) RequireTransportSecurity() bool { return true }

// TestServeWithTLSTokensAndAudit runs `brokerd --config` with tls, a
// token, an allow-list and an audit log, listening on all interfaces
// (allowed because of tls), and checks that callers are authenticated,
// that the credential is issued to the token's identity, and that the
// audit log it leaves verifies and holds no secret.
func TestServeWithTLSTokensAndAudit(t *testing.T) {
	c := writeConfig(t, "0.0.0.0:0", "")
	ca := testpki.NewCA(t, "brokerd test CA")
	certFile, keyFile := ca.WriteLeaf(t, c.dir, "server", testpki.Leaf{CN: "brokerd", Server: true})
	const token = "svc-token-2f8e6a0c4b1d9e7f3a5c"
	auditPath := filepath.Join(c.dir, "audit.log")
	extra := "tls: {cert_file: " + certFile + ", key_file: " + keyFile + "}\n" +
		"tokens: [{identity: svc, sha256: " + server.TokenHash(token) + "}]\n" +
		"audit: {path: " + auditPath + "}\n"
	yml, err := os.ReadFile(c.path)
	if err != nil {
		t.Fatal(err)
	}
	yml = []byte(strings.Replace(string(yml), "max_ttl: 1h}", "max_ttl: 1h, allowed: [svc]}", 1) + extra)
	if err := os.WriteFile(c.path, yml, 0o600); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"--config", c.path}, &stdout, &stderr) }()

	// The port was chosen by the kernel; brokerd logs it.
	addrRE := regexp.MustCompile(`msg=serving listen=\S*:(\d+)`)
	var port string
	deadline := time.Now().Add(60 * time.Second)
	for port == "" {
		if m := addrRE.FindStringSubmatch(stderr.String()); m != nil {
			port = m[1]
			break
		}
		select {
		case code := <-done:
			t.Fatalf("brokerd exited %d:\n%s", code, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("brokerd did not log its address:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond) // polling the log, with a deadline
	}

	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	tlsCreds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	newConn := func(opts ...grpc.DialOption) *grpc.ClientConn {
		conn, err := grpc.NewClient("passthrough:///127.0.0.1:"+port, append([]grpc.DialOption{grpc.WithTransportCredentials(tlsCreds)}, opts...)...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	anon := newConn()
	callCtx, callCancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer callCancel()
	if resp, err := healthpb.NewHealthClient(anon).Check(callCtx, &healthpb.HealthCheckRequest{}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health over TLS without credentials: %v, %v", resp, err)
	}
	_, err = credbrokerv1.NewCredentialServiceClient(anon).IssueCredential(callCtx, &credbrokerv1.IssueCredentialRequest{Role: "read_only"})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("issue without credentials: %v, want Unauthenticated", err)
	}
	svc := newConn(grpc.WithPerRPCCredentials(tokenCreds(token)))
	resp, err := credbrokerv1.NewCredentialServiceClient(svc).IssueCredential(callCtx, &credbrokerv1.IssueCredentialRequest{Role: "read_only"})
	if err != nil {
		t.Fatalf("issue with the token: %v", err)
	}
	if resp.GetLease().GetClient() != "svc" {
		t.Errorf("lease client %q, want svc", resp.GetLease().GetClient())
	}

	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d:\n%s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("brokerd did not stop")
	}

	f, err := os.Open(auditPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := audit.Verify(f, nil)
	if err != nil {
		t.Fatalf("audit log: %v", err)
	}
	if res.Records < 4 { // start, the refused issue, the issue request, the lease's issue event
		t.Errorf("audit log has %d records", res.Records)
	}
	data, _ := os.ReadFile(auditPath)
	for _, want := range []string{`"event":"start"`, `"outcome":"denied"`, `"event":"issue"`} {
		if !strings.Contains(string(data), want) {
			t.Errorf("audit log lacks %s:\n%s", want, data)
		}
	}
	for _, secret := range []string{token, resp.GetCredential().GetPassword(), c.target.AdminPassword} {
		if strings.Contains(string(data), secret) || strings.Contains(stderr.String(), secret) {
			t.Error("a token or password is in the audit log or brokerd's log")
		}
	}
	if !strings.Contains(stderr.String(), "msg=security authentication=true tls=true") {
		t.Errorf("brokerd did not log its security configuration:\n%s", stderr.String())
	}
}
