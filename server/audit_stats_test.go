package server

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/credbroker/credbroker/audit"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// Calls grpc-go refuses before any interceptor runs (a message over the
// size limit, a string field that is not UTF-8) are audited too, once each,
// with their method, peer and status.
func TestCallsRefusedBeforeInterceptorsAreAudited(t *testing.T) {
	ctx := testContext(t)
	h := newSecureHarness(t, secureOptions{
		tokens:       []TokenEntry{{Identity: "svc", SHA256: TokenHash("token-0123456789")}},
		allowed:      map[string][]string{roleReadOnly: {"svc"}},
		maxRecvBytes: 16 << 10,
	})
	conn := h.dial(t, clientCreds{token: "token-0123456789"})
	cred := pb.NewCredentialServiceClient(conn)

	_, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Metadata: map[string]string{"k": strings.Repeat("v", 20<<10)}})
	wantCode(t, "a 20 KiB request to a 16 KiB limit", err, codes.ResourceExhausted)
	var out []byte
	err = conn.Invoke(ctx, "/credbroker.v1.CredentialService/RevokeLease", rawString(1, "\xff\xfe"), &out, grpc.ForceCodec(rawCodec{}))
	wantCode(t, "a lease id that is not UTF-8", err, codes.Internal)
	// And one the interceptors see, to show it is recorded once.
	_, err = cred.LookupLease(ctx, &pb.LookupLeaseRequest{LeaseId: strings.Repeat("a", 32)})
	wantCode(t, "an unknown lease", err, codes.NotFound)

	// A call refused before the interceptors is recorded by the stats
	// handler at the call's end, which may come after the client has its
	// answer: wait, with a deadline, for the three records.
	var count map[string]int
	var byMethod map[string]audit.Record
	for deadline := time.Now().Add(10 * time.Second); ; {
		count, byMethod = map[string]int{}, map[string]audit.Record{}
		for _, r := range h.auditRecords(t, nil) {
			if r.Event == audit.EventRequest {
				m := r.Method[strings.LastIndex(r.Method, "/")+1:]
				count[m]++
				byMethod[m] = r
			}
		}
		if len(byMethod) >= 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond) // polling a file: a condition with a deadline
	}
	for _, tc := range []struct{ method, code, msg string }{
		{"IssueCredential", "ResourceExhausted", "larger than max"},
		{"RevokeLease", "Internal", "invalid UTF-8"},
		{"LookupLease", "NotFound", "not found"},
	} {
		r, ok := byMethod[tc.method]
		if !ok {
			t.Errorf("no record of the %s call", tc.method)
			continue
		}
		if count[tc.method] != 1 {
			t.Errorf("%d records of the %s call, want 1", count[tc.method], tc.method)
		}
		if r.Code != tc.code || !strings.Contains(r.Message, tc.msg) || r.Peer == "" {
			t.Errorf("%s record: code %s, message %q, peer %q; want %s, %q and a peer", tc.method, r.Code, r.Message, r.Peer, tc.code, tc.msg)
		}
	}
}
