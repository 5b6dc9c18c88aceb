package server

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// TestLifecycleEventsAudited checks that what happens to leases without a
// request — expiry, and reconciliation dropping a user no lease knows —
// is in the audit trail beside the requests, HMAC-chained.
func TestLifecycleEventsAudited(t *testing.T) {
	ctx := testContext(t)
	key := []byte("lifecycle-test-key-0123456789abcdef")
	h := newSecureHarness(t, secureOptions{
		tokens:   []TokenEntry{{Identity: "svc", SHA256: TokenHash("token-svc-0123456789")}},
		allowed:  map[string][]string{roleReadOnly: {"svc"}},
		auditKey: key,
	})
	cred, _ := h.clients(t, clientCreds{token: "token-svc-0123456789"})

	short, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Ttl: durationpb.New(2 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: short.GetLease().GetId(), Increment: durationpb.New(3 * time.Second)}); err != nil {
		t.Fatal(err)
	}

	// A member of the marker role that no lease knows, as a crash between
	// CREATE ROLE and the intent's removal could leave (here made by hand).
	conn, err := pgx.Connect(ctx, h.target.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	orphan := "cb_orphan_" + short.GetLease().GetId()[:8]
	// Granted to the broker's admin, as the engine does for every user it
	// makes (DROP OWNED needs it). WITH ADMIN OPTION: on PostgreSQL 16+ the
	// admin holds it on every role it created itself, and may alter or drop
	// no other.
	for _, sql := range []string{
		"CREATE ROLE " + orphan + " NOLOGIN IN ROLE " + h.target.MarkerRole,
		"GRANT " + orphan + " TO " + h.target.AdminUser + " WITH ADMIN OPTION",
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.broker.Reconcile(ctx); err != nil {
		t.Fatalf("Reconcile: %v", err)
	}

	// Wait for the expiry manager to end the short lease.
	deadline := time.Now().Add(30 * time.Second)
	for {
		l, err := h.broker.Lookup(ctx, short.GetLease().GetId())
		if err == nil && l.State == broker.StateExpired {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease not expired in time: %v, %v", l.State, err)
		}
		time.Sleep(50 * time.Millisecond) // polling a condition, with a deadline
	}

	// The expiry manager writes the audit record right after it stores the
	// tombstone, so the lease can read EXPIRED a moment before the record
	// is in the file: wait for the record too.
	var recs []audit.Record
	for {
		recs = h.auditRecords(t, key)
		if _, ok := findRecord(recs, func(r audit.Record) bool {
			return r.Event == broker.AuditExpire && r.Username == short.GetCredential().GetUsername()
		}); ok || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // polling a condition, with a deadline
	}
	want := []struct {
		event    string
		username string
	}{
		{broker.AuditIssue, short.GetCredential().GetUsername()},
		{broker.AuditRenew, short.GetCredential().GetUsername()},
		{broker.AuditReconcileDrop, orphan},
		{broker.AuditExpire, short.GetCredential().GetUsername()},
	}
	for _, w := range want {
		r, ok := findRecord(recs, func(r audit.Record) bool { return r.Event == w.event && r.Username == w.username })
		if !ok {
			t.Errorf("no %s record for %s", w.event, w.username)
			continue
		}
		if w.event != broker.AuditReconcileDrop && (r.Identity != "svc" || r.Role != roleReadOnly || r.LeaseID != short.GetLease().GetId()) {
			t.Errorf("%s record: %+v, want identity svc, role, lease id", w.event, r)
		}
		if r.MAC != audit.MACHMAC {
			t.Errorf("%s record not HMAC-chained", w.event)
		}
	}
	if _, ok := findRecord(recs, func(r audit.Record) bool {
		return r.Event == audit.EventRequest && r.Method == "/credbroker.v1.CredentialService/IssueCredential" &&
			r.Outcome == audit.OutcomeOK && r.Username == short.GetCredential().GetUsername() && r.Identity == "svc"
	}); !ok {
		t.Error("no request record of the issue with its username")
	}
}
