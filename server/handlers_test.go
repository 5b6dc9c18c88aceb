package server

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/internal/pgtest"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// wellFormedID has the shape of a lease id but names no lease.
const wellFormedID = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

func TestIssueCredentialLogsIn(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)

	resp, err := h.cred.IssueCredential(as(ctx, "svc-a", false), &pb.IssueCredentialRequest{
		Role:     roleReadOnly,
		Ttl:      durationpb.New(5 * time.Minute),
		Metadata: map[string]string{"pod": "web-1"},
	})
	if err != nil {
		t.Fatalf("IssueCredential: %v", err)
	}
	l, c := resp.GetLease(), resp.GetCredential()
	if l.GetClient() != "svc-a" || l.GetRole() != roleReadOnly || l.GetTarget() != "main" ||
		l.GetState() != pb.LeaseState_LEASE_STATE_ACTIVE || l.GetMetadata()["pod"] != "web-1" {
		t.Errorf("lease = %v", l)
	}
	if got := l.GetExpireTime().AsTime().Sub(l.GetIssueTime().AsTime()); got != 5*time.Minute {
		t.Errorf("ttl granted = %v, want 5m", got)
	}
	if l.GetEndTime() != nil {
		t.Errorf("live lease has end_time %v", l.GetEndTime())
	}
	if c.GetUsername() != l.GetUsername() || c.GetPassword() == "" || c.GetHost() == "" || c.GetPort() == 0 {
		t.Errorf("credential = {user %q host %q port %d db %q}", c.GetUsername(), c.GetHost(), c.GetPort(), c.GetDatabase())
	}

	// The DSN logs in with the password, as the issued user.
	conn, err := pgx.Connect(ctx, c.GetDsn())
	if err != nil {
		t.Fatalf("connect with the issued credential: %v", err)
	}
	defer conn.Close(context.Background())
	var user string
	if err := conn.QueryRow(ctx, "SELECT session_user").Scan(&user); err != nil || user != c.GetUsername() {
		t.Fatalf("session_user = %q, %v; want %q", user, err, c.GetUsername())
	}
	// Read-only: reading works, writing is refused by PostgreSQL.
	table := pgtest.DemoTable
	if _, err := conn.Exec(ctx, "SELECT count(*) FROM "+table); err != nil {
		t.Errorf("read-only user cannot read %s: %v", table, err)
	}
	_, err = conn.Exec(ctx, "INSERT INTO "+table+" (note) VALUES ('written')")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" { // insufficient_privilege
		t.Errorf("INSERT by a read-only user: err = %v, want permission denied (42501)", err)
	}

	// The password is in the response only: never in a log line.
	if strings.Contains(h.logs.String(), c.GetPassword()) {
		t.Error("the issued password appears in the logs")
	}
	if !strings.Contains(h.logs.String(), "method=/credbroker.v1.CredentialService/IssueCredential") {
		t.Errorf("no log line for IssueCredential:\n%s", h.logs.String())
	}

	// The owner revokes: when RevokeLease returns, the open session is
	// ended and the password no longer logs in.
	if _, err := h.cred.RevokeLease(as(ctx, "svc-a", false), &pb.RevokeLeaseRequest{LeaseId: l.GetId()}); err != nil {
		t.Fatalf("RevokeLease: %v", err)
	}
	if _, err := conn.Exec(ctx, "SELECT 1"); err == nil {
		t.Error("the revoked user's session still runs queries")
	}
	if c2, err := pgx.Connect(ctx, c.GetDsn()); err == nil {
		c2.Close(context.Background())
		t.Error("the revoked credential still logs in")
	}
}

func TestStatusCodes(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)
	owner := as(ctx, "svc-a", false)
	admin := as(ctx, "ops", true)

	badIDs := map[string]string{
		"empty":     "",
		"quote":     "aaaaaaaaaaaaaaa'aaaaaaaaaaaaaaaa",
		"semicolon": "aaaaaaaaaaaaaaaa;DROP ROLE x;aaa",
		"nul":       "aaaaaaaaaaaaaaaa\x00aaaaaaaaaaaaaaa",
		"200 bytes": strings.Repeat("a", 200),
		"uppercase": strings.ToUpper(wellFormedID),
	}

	type call struct {
		name string
		ctx  context.Context
		do   func(ctx context.Context) error
		want codes.Code
	}
	calls := []call{
		{"issue unknown role", owner, func(ctx context.Context) error {
			_, err := h.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "no_such_role"})
			return err
		}, codes.NotFound},
		{"issue empty role", owner, func(ctx context.Context) error {
			_, err := h.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{})
			return err
		}, codes.InvalidArgument},
		{"issue malformed role", owner, func(ctx context.Context) error {
			_, err := h.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "x'; DROP ROLE y;--"})
			return err
		}, codes.InvalidArgument},
		{"issue negative ttl", owner, func(ctx context.Context) error {
			_, err := h.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Ttl: durationpb.New(-time.Second)})
			return err
		}, codes.InvalidArgument},
		{"issue invalid duration", owner, func(ctx context.Context) error {
			_, err := h.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Ttl: &durationpb.Duration{Seconds: 1, Nanos: -5}})
			return err
		}, codes.InvalidArgument},
		{"issue bad metadata", owner, func(ctx context.Context) error {
			_, err := h.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Metadata: map[string]string{"bad key\x00": "v"}})
			return err
		}, codes.InvalidArgument},
		{"issue unauthenticated", ctx, func(ctx context.Context) error {
			_, err := h.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
			return err
		}, codes.Unauthenticated},
		{"renew unknown lease", owner, func(ctx context.Context) error {
			_, err := h.cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: wellFormedID})
			return err
		}, codes.NotFound},
		{"revoke unknown lease", owner, func(ctx context.Context) error {
			_, err := h.cred.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: wellFormedID})
			return err
		}, codes.NotFound},
		{"lookup unknown lease", admin, func(ctx context.Context) error {
			_, err := h.cred.LookupLease(ctx, &pb.LookupLeaseRequest{LeaseId: wellFormedID})
			return err
		}, codes.NotFound},
		{"renew negative increment", owner, func(ctx context.Context) error {
			_, err := h.cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: wellFormedID, Increment: durationpb.New(-time.Minute)})
			return err
		}, codes.InvalidArgument},
		{"revoke leases without selector", admin, func(ctx context.Context) error {
			_, err := h.admin.RevokeLeases(ctx, &pb.RevokeLeasesRequest{})
			return err
		}, codes.InvalidArgument},
		{"revoke leases with a bad id", admin, func(ctx context.Context) error {
			_, err := h.admin.RevokeLeases(ctx, &pb.RevokeLeasesRequest{LeaseIds: []string{badIDs["semicolon"]}})
			return err
		}, codes.InvalidArgument},
		{"list with a bad page token", admin, func(ctx context.Context) error {
			_, err := h.admin.ListLeases(ctx, &pb.ListLeasesRequest{PageToken: "not-a-token!"})
			return err
		}, codes.InvalidArgument},
		{"list with a forged page token", admin, func(ctx context.Context) error {
			_, err := h.admin.ListLeases(ctx, &pb.ListLeasesRequest{PageToken: encodePageToken("'; --")})
			return err
		}, codes.InvalidArgument},
		{"list with a negative page size", admin, func(ctx context.Context) error {
			_, err := h.admin.ListLeases(ctx, &pb.ListLeasesRequest{PageSize: -1})
			return err
		}, codes.InvalidArgument},
		{"list with an unknown state", admin, func(ctx context.Context) error {
			_, err := h.admin.ListLeases(ctx, &pb.ListLeasesRequest{State: pb.LeaseState(99)})
			return err
		}, codes.InvalidArgument},
	}
	for name, id := range badIDs {
		calls = append(calls,
			call{"renew id " + name, owner, func(ctx context.Context) error {
				_, err := h.cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: id})
				return err
			}, codes.InvalidArgument},
			call{"revoke id " + name, owner, func(ctx context.Context) error {
				_, err := h.cred.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: id})
				return err
			}, codes.InvalidArgument},
			call{"lookup id " + name, admin, func(ctx context.Context) error {
				_, err := h.cred.LookupLease(ctx, &pb.LookupLeaseRequest{LeaseId: id})
				return err
			}, codes.InvalidArgument},
		)
	}
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			err := c.do(c.ctx)
			if got := status.Code(err); got != c.want {
				t.Fatalf("code = %v (%v), want %v", got, err, c.want)
			}
			msg := status.Convert(err).Message()
			if msg == "" || msg == internalMessage {
				t.Errorf("message %q does not say what was wrong", msg)
			}
			if strings.ContainsRune(msg, 0) {
				t.Errorf("message echoes a NUL byte: %q", msg)
			}
		})
	}
}

func TestAuthorization(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)
	mine := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease()
	other := as(ctx, "svc-b", false)

	// Another client's lease answers exactly like a lease that does not
	// exist: same code, same message shape.
	_, errMissing := h.cred.LookupLease(other, &pb.LookupLeaseRequest{LeaseId: wellFormedID})
	for name, do := range map[string]func() error{
		"lookup": func() error {
			_, err := h.cred.LookupLease(other, &pb.LookupLeaseRequest{LeaseId: mine.GetId()})
			return err
		},
		"renew": func() error {
			_, err := h.cred.RenewLease(other, &pb.RenewLeaseRequest{LeaseId: mine.GetId()})
			return err
		},
		"revoke": func() error {
			_, err := h.cred.RevokeLease(other, &pb.RevokeLeaseRequest{LeaseId: mine.GetId()})
			return err
		},
	} {
		t.Run("other client "+name, func(t *testing.T) {
			err := do()
			if status.Code(err) != codes.NotFound {
				t.Fatalf("err = %v, want NotFound", err)
			}
			want := strings.ReplaceAll(status.Convert(errMissing).Message(), wellFormedID, mine.GetId())
			if got := status.Convert(err).Message(); got != want {
				t.Errorf("message %q differs from a missing lease's %q", got, want)
			}
		})
	}

	t.Run("non-admin is denied every AdminService method", func(t *testing.T) {
		for name, do := range map[string]func() error{
			"ListLeases": func() error {
				_, err := h.admin.ListLeases(other, &pb.ListLeasesRequest{})
				return err
			},
			"RevokeLeases": func() error {
				_, err := h.admin.RevokeLeases(other, &pb.RevokeLeasesRequest{Client: "svc-a"})
				return err
			},
			"ListRoles": func() error {
				_, err := h.admin.ListRoles(other, &pb.ListRolesRequest{})
				return err
			},
		} {
			if err := do(); status.Code(err) != codes.PermissionDenied {
				t.Errorf("%s: err = %v, want PermissionDenied", name, err)
			}
		}
	})

	t.Run("the lease survived the other client", func(t *testing.T) {
		got, err := h.cred.LookupLease(as(ctx, "ops", true), &pb.LookupLeaseRequest{LeaseId: mine.GetId()})
		if err != nil || got.GetLease().GetState() != pb.LeaseState_LEASE_STATE_ACTIVE {
			t.Fatalf("admin lookup = %v, %v", got, err)
		}
	})

	t.Run("owner renews and revokes its own lease", func(t *testing.T) {
		owner := as(ctx, "svc-a", false)
		if _, err := h.cred.RenewLease(owner, &pb.RenewLeaseRequest{LeaseId: mine.GetId(), Increment: durationpb.New(20 * time.Minute)}); err != nil {
			t.Fatalf("owner renew: %v", err)
		}
		rev, err := h.cred.RevokeLease(owner, &pb.RevokeLeaseRequest{LeaseId: mine.GetId()})
		if err != nil || rev.GetLease().GetState() != pb.LeaseState_LEASE_STATE_REVOKED || rev.GetLease().GetEndTime() == nil {
			t.Fatalf("owner revoke = %v, %v", rev, err)
		}
		// Revoking again succeeds and changes nothing.
		again, err := h.cred.RevokeLease(owner, &pb.RevokeLeaseRequest{LeaseId: mine.GetId()})
		if err != nil || !again.GetLease().GetEndTime().AsTime().Equal(rev.GetLease().GetEndTime().AsTime()) {
			t.Fatalf("second revoke = %v, %v", again, err)
		}
		// Renewing a revoked lease is a failed precondition.
		_, err = h.cred.RenewLease(owner, &pb.RenewLeaseRequest{LeaseId: mine.GetId()})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("renew revoked: err = %v, want FailedPrecondition", err)
		}
	})

	t.Run("the client of a lease is the authenticated identity", func(t *testing.T) {
		l := h.issue(t, ctx, "svc-c", roleReadOnly).GetLease()
		if l.GetClient() != "svc-c" {
			t.Errorf("client = %q, want svc-c", l.GetClient())
		}
	})
}

func TestKeepAlive(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)
	lease := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease()

	sctx, cancel := context.WithTimeout(as(ctx, "svc-a", false), 30*time.Second)
	defer cancel()
	stream, err := h.cred.KeepAlive(sctx)
	if err != nil {
		t.Fatal(err)
	}
	send := func(id string, inc time.Duration) {
		t.Helper()
		if err := stream.Send(&pb.KeepAliveRequest{LeaseId: id, Increment: durationpb.New(inc)}); err != nil {
			t.Fatalf("Send: %v", err)
		}
	}
	// recv waits for the next answer about id (answers for other leases,
	// such as the broker's echo of a renewal, are skipped).
	recv := func(id string) *pb.KeepAliveResponse {
		t.Helper()
		for {
			r, err := stream.Recv()
			if err != nil {
				t.Fatalf("Recv: %v", err)
			}
			if r.GetLease().GetId() == id {
				return r
			}
		}
	}

	send(lease.GetId(), 30*time.Minute)
	r := recv(lease.GetId())
	if r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
		t.Fatalf("renew answered %v (%s)", r.GetEvent(), r.GetMessage())
	}
	if !r.GetLease().GetExpireTime().AsTime().After(lease.GetExpireTime().AsTime()) {
		t.Errorf("expire_time %v not extended past %v", r.GetLease().GetExpireTime().AsTime(), lease.GetExpireTime().AsTime())
	}

	send(wellFormedID, 0)
	if r := recv(wellFormedID); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND {
		t.Fatalf("unknown lease answered %v", r.GetEvent())
	}
	send("x'; DROP ROLE y; --", 0)
	if r := recv("x'; DROP ROLE y; --"); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND || r.GetMessage() == "" {
		t.Fatalf("malformed id answered %v %q", r.GetEvent(), r.GetMessage())
	}
	send(lease.GetId(), -time.Second)
	if r := recv(lease.GetId()); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_UNSPECIFIED ||
		!strings.HasPrefix(r.GetMessage(), "InvalidArgument: ") {
		t.Fatalf("negative increment answered %v %q", r.GetEvent(), r.GetMessage())
	}

	// The stream is still usable after all that.
	send(lease.GetId(), 30*time.Minute)
	if r := recv(lease.GetId()); r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
		t.Fatalf("renew after errors answered %v (%s)", r.GetEvent(), r.GetMessage())
	}

	// An admin revocation is pushed to the stream without being asked.
	n, err := h.admin.RevokeLeases(as(ctx, "ops", true), &pb.RevokeLeasesRequest{LeaseIds: []string{lease.GetId()}})
	if err != nil || n.GetRevokedCount() != 1 {
		t.Fatalf("RevokeLeases = %v, %v", n, err)
	}
	r = recv(lease.GetId())
	if r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED || r.GetLease().GetState() != pb.LeaseState_LEASE_STATE_REVOKED {
		t.Fatalf("after admin revoke: %v, state %v", r.GetEvent(), r.GetLease().GetState())
	}

	// Closing our side ends the stream cleanly.
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := stream.Recv()
		if err == nil {
			continue
		}
		if !errors.Is(err, io.EOF) {
			t.Fatalf("stream ended with %v, want EOF", err)
		}
		break
	}
}

func TestKeepAliveMaxTTLAndOwnership(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)
	// Issued at its max TTL: a renewal cannot extend it.
	short := h.issue(t, ctx, "svc-a", roleShort).GetLease()
	theirs := h.issue(t, ctx, "svc-b", roleReadOnly).GetLease()

	sctx, cancel := context.WithTimeout(as(ctx, "svc-a", false), 30*time.Second)
	defer cancel()
	stream, err := h.cred.KeepAlive(sctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{short.GetId(), theirs.GetId()} {
		if err := stream.Send(&pb.KeepAliveRequest{LeaseId: id}); err != nil {
			t.Fatal(err)
		}
	}
	got := map[string]*pb.KeepAliveResponse{}
	for len(got) < 2 {
		r, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		got[r.GetLease().GetId()] = r
	}
	if r := got[short.GetId()]; r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_MAX_TTL_REACHED {
		t.Errorf("lease at its max TTL answered %v", r.GetEvent())
	}
	// Another client's lease is unknown to this stream, and nothing about
	// it but its id is sent.
	if r := got[theirs.GetId()]; r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND ||
		r.GetLease().GetClient() != "" || r.GetLease().GetUsername() != "" {
		t.Errorf("other client's lease answered %v", r)
	}
}

func TestKeepAliveEndsOnDrain(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)
	lease := h.issue(t, ctx, "svc-a", roleReadOnly).GetLease()
	sctx, cancel := context.WithTimeout(as(ctx, "svc-a", false), 30*time.Second)
	defer cancel()
	stream, err := h.cred.KeepAlive(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.KeepAliveRequest{LeaseId: lease.GetId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}

	h.drainer.Drain()
	for {
		_, err := stream.Recv()
		if err == nil {
			continue
		}
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("stream ended with %v, want Unavailable", err)
		}
		break
	}
	hc := healthpb.NewHealthClient(h.conn)
	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: pb.CredentialService_ServiceDesc.ServiceName})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health after drain = %v, %v", resp, err)
	}
}

func TestListLeasesPaging(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)
	admin := as(ctx, "ops", true)
	want := map[string]bool{}
	for range 5 {
		want[h.issue(t, ctx, "svc-a", roleReadOnly).GetLease().GetId()] = true
	}
	h.issue(t, ctx, "svc-b", roleReadOnly)

	seen := map[string]bool{}
	token := ""
	pages := 0
	for {
		resp, err := h.admin.ListLeases(admin, &pb.ListLeasesRequest{Client: "svc-a", PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatalf("ListLeases page %d: %v", pages, err)
		}
		pages++
		if len(resp.GetLeases()) > 2 {
			t.Fatalf("page of %d leases, asked for 2", len(resp.GetLeases()))
		}
		for _, l := range resp.GetLeases() {
			if l.GetClient() != "svc-a" || seen[l.GetId()] {
				t.Errorf("unexpected or repeated lease %v", l)
			}
			seen[l.GetId()] = true
		}
		token = resp.GetNextPageToken()
		if token == "" {
			break
		}
		if pages > 10 {
			t.Fatal("paging does not end")
		}
	}
	if len(seen) != len(want) || pages < 3 {
		t.Errorf("listed %d leases in %d pages, want %d in at least 3", len(seen), pages, len(want))
	}
	for id := range want {
		if !seen[id] {
			t.Errorf("lease %s not listed", id)
		}
	}

	// page_size above the cap is accepted (capped), and filters combine.
	resp, err := h.admin.ListLeases(admin, &pb.ListLeasesRequest{PageSize: 5000, State: pb.LeaseState_LEASE_STATE_ACTIVE})
	if err != nil || len(resp.GetLeases()) != 6 || resp.GetNextPageToken() != "" {
		t.Fatalf("ListLeases(all active) = %d leases, token %q, %v", len(resp.GetLeases()), resp.GetNextPageToken(), err)
	}
	resp, err = h.admin.ListLeases(admin, &pb.ListLeasesRequest{State: pb.LeaseState_LEASE_STATE_REVOKED})
	if err != nil || len(resp.GetLeases()) != 0 {
		t.Fatalf("ListLeases(revoked) = %v, %v", resp, err)
	}

	// Revoking by client takes that client's leases only.
	n, err := h.admin.RevokeLeases(admin, &pb.RevokeLeasesRequest{Client: "svc-a"})
	if err != nil || n.GetRevokedCount() != 5 {
		t.Fatalf("RevokeLeases(client svc-a) = %v, %v", n, err)
	}
	resp, err = h.admin.ListLeases(admin, &pb.ListLeasesRequest{State: pb.LeaseState_LEASE_STATE_ACTIVE})
	if err != nil || len(resp.GetLeases()) != 1 || resp.GetLeases()[0].GetClient() != "svc-b" {
		t.Fatalf("active after revoke = %v, %v", resp, err)
	}
}

func TestListRoles(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)
	resp, err := h.admin.ListRoles(as(ctx, "ops", true), &pb.ListRolesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetRoles()) != 2 {
		t.Fatalf("roles = %v", resp.GetRoles())
	}
	r := resp.GetRoles()[0] // sorted: read_only, short
	if r.GetName() != roleReadOnly || r.GetTarget() != "main" || r.GetProxyRole() == "" ||
		r.GetDefaultTtl().AsDuration() != 10*time.Minute || r.GetMaxTtl().AsDuration() != time.Hour ||
		r.GetDatabase() != h.engine.Endpoint().Database {
		t.Errorf("role = %v", r)
	}
}

func TestHealthAndReflection(t *testing.T) {
	h := newHarness(t)
	ctx := testContext(t)

	// Health needs no credentials: probes carry none.
	hc := healthpb.NewHealthClient(h.conn)
	for _, svc := range []string{"", pb.CredentialService_ServiceDesc.ServiceName, pb.AdminService_ServiceDesc.ServiceName} {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health %q = %v, %v", svc, resp, err)
		}
	}

	stream, err := reflectionpb.NewServerReflectionClient(h.conn).ServerReflectionInfo(as(ctx, "ops", false))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, s := range resp.GetListServicesResponse().GetService() {
		names[s.GetName()] = true
	}
	for _, want := range []string{"credbroker.v1.CredentialService", "credbroker.v1.AdminService", "grpc.health.v1.Health"} {
		if !names[want] {
			t.Errorf("reflection does not list %s (got %v)", want, names)
		}
	}
	_ = stream.CloseSend()
}
