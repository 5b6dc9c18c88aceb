package server

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/internal/tmpfs"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// While the store's disk is full, IssueCredential answers Unavailable,
// without the store's path, and hands out nothing; once the space is back
// it issues again, from the same broker. (The broker's side, revocations
// included, is broker.TestDiskFullLosesNothing.)
func TestIssueOnAFullDiskIsUnavailable(t *testing.T) {
	fs := tmpfs.Mount(t, 2<<20)
	h := newHarnessWith(t, harnessOptions{storeDir: fs.Dir})
	ctx := testContext(t)
	issued := map[string]bool{}
	md := map[string]string{"a": strings.Repeat("a", 500), "b": strings.Repeat("b", 500), "c": strings.Repeat("c", 500)}
	req := &pb.IssueCredentialRequest{Role: roleReadOnly, Metadata: md}
	for range 20 {
		resp, err := h.cred.IssueCredential(as(ctx, "svc", false), req)
		if err != nil {
			t.Fatal(err)
		}
		issued[resp.GetCredential().GetUsername()] = true
	}

	fs.Fill(t)
	var refused error
	for i := 0; refused == nil; i++ {
		if i == 200 {
			t.Fatal("200 issues on a full disk and none refused: bbolt never needed a new page?")
		}
		resp, err := h.cred.IssueCredential(as(ctx, "svc", false), req)
		if err == nil {
			issued[resp.GetCredential().GetUsername()] = true
			continue
		}
		refused = err
		if resp != nil {
			t.Errorf("a refused issue answered %v", resp)
		}
	}
	st, _ := status.FromError(refused)
	if st.Code() != codes.Unavailable {
		t.Errorf("issue on a full disk: %v; want Unavailable", refused)
	}
	if strings.Contains(st.Message(), fs.Dir) {
		t.Errorf("the message names the store's path: %q", st.Message())
	}
	users, err := h.engine.ListManagedUsers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		if !issued[u] {
			t.Errorf("user %s exists, but no issue handed it out", u)
		}
	}

	fs.Free(t)
	if _, err := h.cred.IssueCredential(as(ctx, "svc", false), req); err != nil {
		t.Errorf("issue once the space is back: %v", err)
	}
}
