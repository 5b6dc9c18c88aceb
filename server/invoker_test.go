package server

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// TestInvokerWithoutABrokerIsUnavailable: an Invoker that no server with
// a broker attached answers Unavailable, never a nil dereference, and
// serves no stream.
func TestInvokerWithoutABrokerIsUnavailable(t *testing.T) {
	inv := NewInvoker()
	_ = NewGRPCServer(Config{Invoker: inv}) // no Broker: not attached
	_, err := pb.NewCredentialServiceClient(inv).IssueCredential(context.Background(), &pb.IssueCredentialRequest{Role: "read_only"})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("IssueCredential on a detached Invoker: %v, want Unavailable", err)
	}
	if _, err := inv.Authenticate(context.Background()); status.Code(err) != codes.Unavailable {
		t.Errorf("Authenticate on a detached Invoker: %v, want Unavailable", err)
	}
	if _, err := pb.NewCredentialServiceClient(inv).KeepAlive(context.Background()); status.Code(err) != codes.Unimplemented {
		t.Errorf("KeepAlive through an Invoker: %v, want Unimplemented", err)
	}
}

// TestContextWithCallerIsWhatTheAuthenticatorReads: the token becomes
// the bearer metadata PolicyAuthenticator reads, so a token means the
// same identity over HTTP as over gRPC.
func TestContextWithCallerIsWhatTheAuthenticatorReads(t *testing.T) {
	a, err := NewPolicyAuthenticator([]TokenEntry{{Identity: "svc", SHA256: TokenHash("tok-1")}}, []string{"svc"})
	if err != nil {
		t.Fatal(err)
	}
	id, err := a.Authenticate(ContextWithCaller(context.Background(), Caller{Token: "tok-1"}))
	if err != nil || id.Name != "svc" || !id.Admin {
		t.Errorf("token tok-1: %+v %v, want the admin svc", id, err)
	}
	if _, err := a.Authenticate(ContextWithCaller(context.Background(), Caller{Token: "tok-2"})); err == nil {
		t.Error("an unknown token authenticated")
	}
	if _, err := a.Authenticate(ContextWithCaller(context.Background(), Caller{})); err == nil {
		t.Error("no token and no certificate authenticated")
	}
}
