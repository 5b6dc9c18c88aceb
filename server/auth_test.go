package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/internal/testpki"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: %v, want %s", what, err, code)
	}
}

func TestMutualTLSIdentityFromURISANElseCN(t *testing.T) {
	ctx := testContext(t)
	h := newSecureHarness(t, secureOptions{
		tls: true, clientCA: true,
		admins: []string{"ops-admin"},
		allowed: map[string][]string{
			roleReadOnly: {"spiffe://test.example/ns/payments/*", "svc-cn"},
		},
	})

	for _, tc := range []struct {
		name string
		spec testpki.Leaf
		want string
	}{
		{"URI SAN wins over CN", testpki.Leaf{CN: "ignored-cn", URI: "spiffe://test.example/ns/payments/api"}, "spiffe://test.example/ns/payments/api"},
		{"CN without URI SAN", testpki.Leaf{CN: "svc-cn"}, "svc-cn"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cred, _ := h.clients(t, clientCreds{cert: &tc.spec})
			resp, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
			if err != nil {
				t.Fatalf("IssueCredential: %v", err)
			}
			if got := resp.GetLease().GetClient(); got != tc.want {
				t.Errorf("lease client %q, want %q", got, tc.want)
			}
		})
	}

	t.Run("glob does not cross a path segment", func(t *testing.T) {
		cred, _ := h.clients(t, clientCreds{cert: &testpki.Leaf{URI: "spiffe://test.example/ns/payments/api/extra"}})
		_, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
		wantCode(t, "issue outside the glob", err, codes.PermissionDenied)
	})

	t.Run("no client certificate", func(t *testing.T) {
		cred, _ := h.clients(t, clientCreds{})
		_, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
		// Mutual TLS is required: the handshake itself fails.
		wantCode(t, "issue without a client certificate", err, codes.Unavailable)
	})

	t.Run("certificate of another CA", func(t *testing.T) {
		other := testpki.NewCA(t, "rogue CA")
		cred, _ := h.clients(t, clientCreds{cert: &testpki.Leaf{CN: "svc-cn"}, ca: other})
		_, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
		wantCode(t, "issue with a rogue certificate", err, codes.Unavailable)
	})

	t.Run("admin by certificate", func(t *testing.T) {
		_, admin := h.clients(t, clientCreds{cert: &testpki.Leaf{CN: "ops-admin"}})
		resp, err := admin.ListLeases(ctx, &pb.ListLeasesRequest{})
		if err != nil {
			t.Fatalf("ListLeases as admin: %v", err)
		}
		if len(resp.GetLeases()) != 2 {
			t.Errorf("admin sees %d leases, want the 2 issued above", len(resp.GetLeases()))
		}
		// Admins are not implicitly allowed to issue.
		cred, _ := h.clients(t, clientCreds{cert: &testpki.Leaf{CN: "ops-admin"}})
		_, err = cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
		wantCode(t, "admin issuing a role it is not allowed", err, codes.PermissionDenied)
	})
}

// servedSerial makes a new TLS connection and returns the serial of the
// certificate the server presents.
func servedSerial(t *testing.T, h *secureHarness) string {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(h.ca.Cert)
	certPEM, keyPEM := h.ca.Issue(t, testpki.Leaf{CN: "probe"})
	pair, _ := tls.X509KeyPair(certPEM, keyPEM)
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", h.addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1",
		Certificates: []tls.Certificate{pair}, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("TLS dial: %v", err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

func TestCertificateRotationWithoutRestart(t *testing.T) {
	ctx := testContext(t)
	h := newSecureHarness(t, secureOptions{
		tls: true, clientCA: true,
		allowed: map[string][]string{roleReadOnly: {"svc"}},
	})
	// A connection made before the rotation.
	cred, _ := h.clients(t, clientCreds{cert: &testpki.Leaf{CN: "svc"}})
	if _, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
		t.Fatalf("before rotation: %v", err)
	}
	before := servedSerial(t, h)

	// Half a rotation: a new certificate whose key is not there yet. The
	// server must keep serving the old pair.
	newCert, newKey := h.ca.Issue(t, testpki.Leaf{CN: "brokerd", Server: true})
	issued := parseCertPEM(t, newCert)
	writeFile(t, h.certFile, newCert)
	if got := servedSerial(t, h); got != before {
		t.Fatalf("served serial %s with a mismatched key on disk; want the old %s", got, before)
	}
	writeFile(t, h.keyFile, newKey)

	deadline := time.Now().Add(10 * time.Second)
	for servedSerial(t, h) != issued.SerialNumber.String() {
		if time.Now().After(deadline) {
			t.Fatalf("server still presents serial %s after the files changed; want %s", servedSerial(t, h), issued.SerialNumber)
		}
	}
	// The connection made before still works, and so do new ones.
	if _, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
		t.Fatalf("old connection after rotation: %v", err)
	}
	cred2, _ := h.clients(t, clientCreds{cert: &testpki.Leaf{CN: "svc"}})
	if _, err := cred2.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
		t.Fatalf("new connection after rotation: %v", err)
	}

	// Rotating the client CA: certificates of the old CA stop working.
	newCA := testpki.NewCA(t, "next CA")
	writeFile(t, h.caFile, newCA.PEM)
	cred3, _ := h.clients(t, clientCreds{cert: &testpki.Leaf{CN: "svc"}}) // signed by the old CA
	_, err := cred3.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	wantCode(t, "old CA's certificate after the client CA rotated", err, codes.Unavailable)

	recs := h.auditRecords(t, nil)
	var ok, failed int
	for _, r := range recs {
		if r.Event == audit.EventTLSReload {
			if r.Outcome == audit.OutcomeOK {
				ok++
			} else {
				failed++
			}
		}
	}
	if ok < 2 || failed < 1 {
		t.Errorf("audit has %d successful and %d failed TLS reloads; want at least 2 and 1", ok, failed)
	}
}

func TestBearerTokens(t *testing.T) {
	ctx := testContext(t)
	const (
		goodToken  = "tok-9f2c6d1e8b7a4c3f-good"
		adminToken = "tok-0a1b2c3d4e5f-admin"
	)
	h := newSecureHarness(t, secureOptions{
		tls: true, clientCA: true, // certificates optional: tokens are configured
		tokens: []TokenEntry{
			{Identity: "batch-job", SHA256: TokenHash(goodToken)},
			{Identity: "ops", SHA256: TokenHash(adminToken)},
		},
		admins:  []string{"ops"},
		allowed: map[string][]string{roleReadOnly: {"batch-job"}},
	})

	cred, _ := h.clients(t, clientCreds{token: goodToken})
	resp, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	if err != nil {
		t.Fatalf("issue with a good token: %v", err)
	}
	if resp.GetLease().GetClient() != "batch-job" {
		t.Errorf("lease client %q, want batch-job", resp.GetLease().GetClient())
	}
	_, admin := h.clients(t, clientCreds{token: goodToken})
	_, err = admin.ListLeases(ctx, &pb.ListLeasesRequest{})
	wantCode(t, "ListLeases as a non-admin token", err, codes.PermissionDenied)
	_, admin = h.clients(t, clientCreds{token: adminToken})
	if _, err := admin.ListLeases(ctx, &pb.ListLeasesRequest{}); err != nil {
		t.Fatalf("ListLeases as the admin token: %v", err)
	}

	badToken := "tok-9f2c6d1e8b7a4c3f-goof"
	cred, _ = h.clients(t, clientCreds{token: badToken})
	_, err = cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	wantCode(t, "issue with a wrong token", err, codes.Unauthenticated)
	if strings.Contains(status.Convert(err).Message(), badToken) {
		t.Errorf("the error echoes the token: %v", err)
	}

	cred, _ = h.clients(t, clientCreds{})
	_, err = cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	wantCode(t, "issue with no credentials", err, codes.Unauthenticated)

	cred, _ = h.clients(t, clientCreds{token: goodToken, cert: &testpki.Leaf{CN: "batch-job"}})
	_, err = cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	wantCode(t, "issue with a token and a certificate", err, codes.Unauthenticated)

	// Nothing secret anywhere: neither token in the audit log or the log.
	raw := readFileString(t, h.auditPath)
	for _, secret := range []string{goodToken, adminToken, badToken, resp.GetCredential().GetPassword()} {
		if strings.Contains(raw, secret) || strings.Contains(h.logs.String(), secret) {
			t.Errorf("a token or password reached the audit log or the server log")
		}
	}
	recs := h.auditRecords(t, nil)
	if _, ok := findRecord(recs, func(r audit.Record) bool {
		return r.Event == audit.EventRequest && r.Outcome == audit.OutcomeDenied && r.Code == "Unauthenticated" &&
			strings.Contains(r.Message, "not recognised") && r.Peer != ""
	}); !ok {
		t.Errorf("no audit record of the refused token:\n%s", raw)
	}
}

func TestDeniedAttemptsAreAudited(t *testing.T) {
	ctx := testContext(t)
	h := newSecureHarness(t, secureOptions{
		tokens: []TokenEntry{
			{Identity: "svc-a", SHA256: TokenHash("token-a-0123456789")},
			{Identity: "svc-b", SHA256: TokenHash("token-b-0123456789")},
		},
		allowed: map[string][]string{roleReadOnly: {"svc-*"}},
	})
	credA, _ := h.clients(t, clientCreds{token: "token-a-0123456789"})
	credB, adminB := h.clients(t, clientCreds{token: "token-b-0123456789"})

	issued, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	leaseID := issued.GetLease().GetId()

	_, err = credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "updater"})
	wantCode(t, "issue of a role not allowed", err, codes.PermissionDenied)
	// Another client's lease answers as if it did not exist...
	_, err = credB.LookupLease(ctx, &pb.LookupLeaseRequest{LeaseId: leaseID})
	wantCode(t, "lookup of another client's lease", err, codes.NotFound)
	_, err = credB.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: leaseID})
	wantCode(t, "revoke of another client's lease", err, codes.NotFound)
	_, err = adminB.RevokeLeases(ctx, &pb.RevokeLeasesRequest{Client: "svc-a"})
	wantCode(t, "admin call by a non-admin", err, codes.PermissionDenied)
	// ... and in a KeepAlive stream.
	stream, err := credB.KeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.KeepAliveRequest{LeaseId: leaseID}); err != nil {
		t.Fatal(err)
	}
	ka, err := stream.Recv()
	if err != nil || ka.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND {
		t.Fatalf("KeepAlive of another client's lease: %v, %v", ka, err)
	}
	stream.CloseSend()
	for {
		if _, err := stream.Recv(); err != nil {
			break
		}
	}

	// The lease is untouched.
	l, err := h.broker.Lookup(ctx, leaseID)
	if err != nil || l.State.String() != "active" {
		t.Fatalf("lease after the denied calls: %v, %v", l.State, err)
	}

	recs := h.auditRecords(t, nil)
	denied := map[string]audit.Record{}
	for _, r := range recs {
		if r.Event == audit.EventRequest && r.Outcome == audit.OutcomeDenied {
			denied[r.Method[strings.LastIndex(r.Method, "/")+1:]] = r
		}
	}
	for _, m := range []string{"IssueCredential", "LookupLease", "RevokeLease", "RevokeLeases", "KeepAlive"} {
		r, ok := denied[m]
		if !ok {
			t.Errorf("no denied record for %s", m)
			continue
		}
		if r.Identity == "" || r.Peer == "" {
			t.Errorf("denied %s record lacks identity or peer: %+v", m, r)
		}
	}
	if r := denied["IssueCredential"]; r.Role != "updater" || r.Identity != "svc-a" {
		t.Errorf("denied issue record: %+v, want role updater by svc-a", r)
	}
	if r := denied["LookupLease"]; r.LeaseID != leaseID || r.Identity != "svc-b" || r.Role != roleReadOnly {
		t.Errorf("denied lookup record: %+v, want lease %s of role %s by svc-b", r, leaseID, roleReadOnly)
	}
	if r := denied["KeepAlive"]; r.LeaseID != leaseID || r.Identity != "svc-b" || r.Role != roleReadOnly {
		t.Errorf("denied KeepAlive record: %+v, want lease %s of role %s by svc-b", r, leaseID, roleReadOnly)
	}

	// Usage over the trail counts the issue and the denial.
	rows, err := audit.Usage(bytesReader([]byte(readFileString(t, h.auditPath))), time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	var issuedA, deniedA int
	for _, r := range rows {
		if r.Identity == "svc-a" && r.Role == roleReadOnly {
			issuedA += r.Issued
		}
		if r.Identity == "svc-a" && r.Role == "updater" {
			deniedA += r.Denied
		}
	}
	if issuedA != 1 || deniedA != 1 {
		t.Errorf("usage: svc-a issued %d read_only and was denied %d updater; want 1 and 1: %+v", issuedA, deniedA, rows)
	}
}

func TestQuotas(t *testing.T) {
	ctx := testContext(t)
	tokens := []TokenEntry{
		{Identity: "svc-a", SHA256: TokenHash("token-a-0123456789")},
		{Identity: "svc-b", SHA256: TokenHash("token-b-0123456789")},
		{Identity: "svc-c", SHA256: TokenHash("token-c-0123456789")},
	}
	allowed := map[string][]string{roleReadOnly: {"*"}, "updater": {"*"}}

	t.Run("active leases per identity and per role", func(t *testing.T) {
		h := newSecureHarness(t, secureOptions{tokens: tokens, allowed: allowed, quotas: Quotas{
			IdentityMaxActive: 2,
			RoleMaxActive:     map[string]int{"updater": 3},
		}})
		credA, _ := h.clients(t, clientCreds{token: "token-a-0123456789"})
		credB, _ := h.clients(t, clientCreds{token: "token-b-0123456789"})
		var first string
		for i := range 2 {
			resp, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
			if err != nil {
				t.Fatalf("issue %d: %v", i, err)
			}
			first = resp.GetLease().GetId()
		}
		_, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
		wantCode(t, "third lease of svc-a", err, codes.ResourceExhausted)
		if msg := status.Convert(err).Message(); !strings.Contains(msg, `identity "svc-a" already holds 2 active leases`) || !strings.Contains(msg, "max_active_per_identity") {
			t.Errorf("quota message %q does not say what was exceeded", msg)
		}
		// Revoking one frees a place.
		if _, err := credA.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: first}); err != nil {
			t.Fatal(err)
		}
		if _, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
			t.Fatalf("issue after a revoke: %v", err)
		}

		// The role quota counts every identity's leases.
		credC, _ := h.clients(t, clientCreds{token: "token-c-0123456789"})
		for _, c := range []pb.CredentialServiceClient{credB, credB, credC} {
			if _, err := c.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "updater"}); err != nil {
				t.Fatalf("updater issue: %v", err)
			}
		}
		_, err = credC.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "updater"})
		wantCode(t, "fourth updater lease", err, codes.ResourceExhausted)
		if msg := status.Convert(err).Message(); !strings.Contains(msg, `role "updater" already has 3 active leases`) {
			t.Errorf("role quota message %q", msg)
		}
		recs := h.auditRecords(t, nil)
		if _, ok := findRecord(recs, func(r audit.Record) bool {
			return r.Outcome == audit.OutcomeQuota && r.Identity == "svc-c" && r.Role == "updater"
		}); !ok {
			t.Error("no audit record of the quota hit")
		}
	})

	t.Run("issue rate per identity", func(t *testing.T) {
		h := newSecureHarness(t, secureOptions{tokens: tokens, allowed: allowed, quotas: Quotas{
			IssueRate: 1.0 / 3600, IssueBurst: 2,
		}})
		credA, _ := h.clients(t, clientCreds{token: "token-a-0123456789"})
		credB, _ := h.clients(t, clientCreds{token: "token-b-0123456789"})
		for i := range 2 {
			if _, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
				t.Fatalf("issue %d within the burst: %v", i, err)
			}
		}
		_, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
		wantCode(t, "issue over the rate", err, codes.ResourceExhausted)
		if msg := status.Convert(err).Message(); !strings.Contains(msg, "rate limit") || !strings.Contains(msg, "try again in") {
			t.Errorf("rate message %q", msg)
		}
		// Another identity has its own allowance.
		if _, err := credB.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
			t.Fatalf("svc-b: %v", err)
		}
		// A refused caller does not use up anyone's allowance: nothing
		// was created for the refused call.
		resp, _, err := h.broker.ListLeases(ctx, brokerFilterClient("svc-a"))
		if err != nil || len(resp) != 2 {
			t.Errorf("svc-a holds %d leases (%v), want the 2 of the burst", len(resp), err)
		}
	})

	// A call refused for an active-lease quota gives its token back: the
	// caller that revokes a lease can issue again at once.
	t.Run("a quota refusal does not use up the rate allowance", func(t *testing.T) {
		h := newSecureHarness(t, secureOptions{tokens: tokens, allowed: allowed, quotas: Quotas{
			IdentityMaxActive: 1, IssueRate: 1.0 / 3600, IssueBurst: 2,
		}})
		credA, _ := h.clients(t, clientCreds{token: "token-a-0123456789"})
		resp, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			_, err = credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
			wantCode(t, "second active lease", err, codes.ResourceExhausted)
			if msg := status.Convert(err).Message(); !strings.Contains(msg, "max_active_per_identity") {
				t.Fatalf("refused for %q, want the active-lease quota", msg)
			}
		}
		if _, err := credA.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: resp.GetLease().GetId()}); err != nil {
			t.Fatal(err)
		}
		if _, err := credA.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
			t.Fatalf("issue with one token of the burst left: %v", err)
		}
	})
}

func TestRequestSizeLimits(t *testing.T) {
	ctx := testContext(t)
	h := newSecureHarness(t, secureOptions{
		tokens:       []TokenEntry{{Identity: "svc", SHA256: TokenHash("token-0123456789")}},
		allowed:      map[string][]string{roleReadOnly: {"svc"}},
		maxRecvBytes: 16 << 10,
	})
	cred, _ := h.clients(t, clientCreds{token: "token-0123456789"})
	md := map[string]string{}
	for i := range 40 {
		md[strings.Repeat("k", 10)+string(rune('a'+i%26))+string(rune('a'+i/26))] = strings.Repeat("v", 500)
	}
	_, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Metadata: md})
	wantCode(t, "a 20 KiB request to a 16 KiB limit", err, codes.ResourceExhausted)

	// Metadata the broker's limits refuse, under the message limit.
	_, err = cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Metadata: map[string]string{"k": strings.Repeat("v", 600)}})
	wantCode(t, "a 600-byte metadata value", err, codes.InvalidArgument)

	// Oversized headers are refused by the transport.
	big := context.Background()
	big, cancel := context.WithTimeout(big, 10*time.Second)
	defer cancel()
	_, err = cred.IssueCredential(metadataContext(big, "x-padding", strings.Repeat("p", 64<<10)), &pb.IssueCredentialRequest{Role: roleReadOnly})
	if err == nil {
		t.Fatal("a 64 KiB header was accepted")
	}
	// Nothing was created by any of these.
	leases, _, err := h.broker.ListLeases(ctx, brokerFilterClient("svc"))
	if err != nil || len(leases) != 0 {
		t.Errorf("leases after refused requests: %d, %v", len(leases), err)
	}
}
