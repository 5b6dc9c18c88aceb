package server

import (
	"os"
	"testing"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// With audit.required, a call that cannot be audited is refused
// (Unavailable) and health turns NOT_SERVING; once the log can be written
// again (here: reopened after the full disk was dealt with), calls are
// served and health is SERVING again.
func TestAuditRequiredRefusesUnauditedCalls(t *testing.T) {
	ctx := testContext(t)
	h := newSecureHarness(t, secureOptions{
		tokens:        []TokenEntry{{Identity: "svc-a", SHA256: TokenHash("token-a-0123456789")}},
		allowed:       map[string][]string{roleReadOnly: {"*"}},
		auditRequired: true,
		auditDevice:   "/dev/full", // every write fails with ENOSPC, as on a full disk
	})
	conn := h.dial(t, clientCreds{token: "token-a-0123456789"})
	cred := pb.NewCredentialServiceClient(conn)
	health := healthpb.NewHealthClient(conn)
	wantHealth := func(what string, want healthpb.HealthCheckResponse_ServingStatus) {
		t.Helper()
		for _, svc := range []string{"", pb.CredentialService_ServiceDesc.ServiceName} {
			resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.GetStatus() != want {
				t.Errorf("%s: health of %q is %v (%v), want %v", what, svc, resp.GetStatus(), err, want)
			}
		}
	}
	activeLeases := func() int {
		t.Helper()
		ls, _, err := h.broker.ListLeases(ctx, broker.LeaseFilter{State: broker.StateActive})
		if err != nil {
			t.Fatal(err)
		}
		return len(ls)
	}

	// Nothing has failed yet: the call runs, but its record cannot be
	// written, so the caller gets no credential.
	wantHealth("before any write", healthpb.HealthCheckResponse_SERVING)
	_, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	wantCode(t, "issue whose record cannot be written", err, codes.Unavailable)
	wantHealth("after a failed write", healthpb.HealthCheckResponse_NOT_SERVING)

	// Now the call is refused before it does anything.
	before := activeLeases()
	_, err = cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	wantCode(t, "issue while the log fails", err, codes.Unavailable)
	stream, err := cred.KeepAlive(ctx)
	if err == nil {
		_, err = stream.Recv()
	}
	wantCode(t, "KeepAlive while the log fails", err, codes.Unavailable)
	if n := activeLeases(); n != before {
		t.Errorf("a refused issue created a lease: %d active, %d before", n, before)
	}

	// The operator frees the disk (here: the path becomes a file) and
	// sends SIGHUP.
	if err := os.Remove(h.auditPath); err != nil {
		t.Fatal(err)
	}
	if err := h.audit.Reopen(); err != nil {
		t.Fatalf("Reopen: %v", err)
	}
	wantHealth("after the log recovered", healthpb.HealthCheckResponse_SERVING)
	if _, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly}); err != nil {
		t.Fatalf("issue once the log can be written: %v", err)
	}
	recs := h.auditRecords(t, nil)
	if len(recs) == 0 || recs[0].Event != audit.EventResumed {
		t.Fatalf("the new file does not start with a resumed record: %+v", recs)
	}
	if _, ok := findRecord(recs, func(r audit.Record) bool {
		return r.Event == audit.EventRequest && r.Method == "/credbroker.v1.CredentialService/IssueCredential" && r.Outcome == audit.OutcomeOK
	}); !ok {
		t.Error("the issue after recovery is not audited")
	}
}
