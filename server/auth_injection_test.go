package server

import (
	"context"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// injectionCorpus is what a hostile or careless caller might put in any
// string: SQL quoting and comment syntax, dollar quotes, backslashes, NUL
// and newlines, names at and past PostgreSQL's 63-byte limit, pg_
// prefixes, names of real roles, and strings that are not UTF-8 at all.
var injectionCorpus = []string{
	"",
	`'`,
	`"`,
	`x'; DROP ROLE postgres; --`,
	`x"; DROP TABLE demo; --`,
	`read_only'; CREATE ROLE evil SUPERUSER; --`,
	`/* comment */ read_only`,
	`read_only -- comment`,
	`$$; DROP ROLE IF EXISTS credbroker_managed; $$`,
	`$tag$ x $tag$`,
	`\`,
	`\'; SELECT pg_sleep(10); --`,
	"read_only\x00",
	"a\x00b",
	"line1\nline2",
	"read_only\r\nDROP ROLE x",
	"\xff\xfe",
	"read_\xc3\x28only",
	strings.Repeat("a", 63),
	strings.Repeat("a", 64),
	strings.Repeat("x", 200),
	"pg_signal_backend",
	"pg_read_all_data",
	"postgres",
	"READ_ONLY",
	" read_only",
	"read_only ",
	"%s%n%x",
	"${jndi:ldap://example.invalid/a}",
	"../../etc/passwd",
	"😀",
	strings.Repeat("a", 32), // a well-formed lease id that does not exist
}

// roleSnapshot is what must not change: every role of the cluster and the
// members of the target's marker role.
type roleSnapshot struct {
	roles, managed []string
}

func snapshotRoles(t *testing.T, ctx context.Context, h *secureHarness) roleSnapshot {
	t.Helper()
	conn, err := pgx.Connect(ctx, h.target.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var s roleSnapshot
	collect := func(dst *[]string, sql string, args ...any) {
		rows, err := conn.Query(ctx, sql, args...)
		if err != nil {
			t.Fatal(err)
		}
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		*dst = names
	}
	collect(&s.roles, `SELECT rolname FROM pg_roles ORDER BY 1`)
	collect(&s.managed, `SELECT u.rolname FROM pg_auth_members m
		JOIN pg_roles u ON u.oid = m.member JOIN pg_roles g ON g.oid = m.roleid
		WHERE g.rolname = $1 ORDER BY 1`, h.target.MarkerRole)
	return s
}

// rawCodec sends bytes as they are, so a test can put invalid UTF-8 on the
// wire, which the generated Go client refuses to marshal.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return v.([]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// rawString encodes a message of one string field.
func rawString(field protowire.Number, s string) []byte {
	b := protowire.AppendTag(nil, field, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// TestInjectionCorpusThroughEveryStringField sends every corpus string
// through every string field of every RPC. Each call must answer a clear
// InvalidArgument or NotFound (PermissionDenied for a well-formed role name
// the caller may not issue: the answer does not reveal whether it exists),
// or succeed where the string is legitimate data (a metadata value, a
// filter that matches nothing); and afterwards no PostgreSQL role may have
// been created or dropped.
func TestInjectionCorpusThroughEveryStringField(t *testing.T) {
	ctx := testContext(t)
	h := newSecureHarness(t, secureOptions{
		tokens: []TokenEntry{
			{Identity: "svc", SHA256: TokenHash("token-svc-0123456789")},
			{Identity: "ops", SHA256: TokenHash("token-ops-0123456789")},
		},
		admins:  []string{"ops"},
		allowed: map[string][]string{roleReadOnly: {"svc"}},
	})
	cred, _ := h.clients(t, clientCreds{token: "token-svc-0123456789"})
	_, admin := h.clients(t, clientCreds{token: "token-ops-0123456789"})
	rawConn := h.dial(t, clientCreds{token: "token-ops-0123456789"})

	// One real lease, so that nothing the corpus does may touch it.
	real, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	before := snapshotRoles(t, ctx, h)
	if !slices.Contains(before.managed, real.GetCredential().GetUsername()) {
		t.Fatalf("the real lease's user is not a member of the marker role: %v", before.managed)
	}

	// check accepts the listed codes; OK only when ok is true.
	check := func(t *testing.T, field, value string, err error, codes ...codes.Code) {
		t.Helper()
		if !slices.Contains(codes, status.Code(err)) {
			t.Errorf("%s = %q: %v; want one of %v", field, value, err, codes)
			return
		}
		if err != nil {
			msg := status.Convert(err).Message()
			if msg == "" || msg == internalMessage {
				t.Errorf("%s = %q: unclear message %q", field, value, msg)
			}
			// A name we refused is not echoed back raw (NUL, newlines).
			if strings.ContainsAny(msg, "\x00\n\r") {
				t.Errorf("%s = %q: message echoes control characters: %q", field, value, msg)
			}
		}
	}
	bad := []codes.Code{codes.InvalidArgument, codes.NotFound}

	for _, v := range injectionCorpus {
		if !utf8.ValidString(v) {
			// The generated client will not send it; the raw test below does.
			continue
		}
		_, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: v})
		check(t, "IssueCredential.role", v, err, append(bad, codes.PermissionDenied)...)

		for _, md := range []map[string]string{{v: "x"}, {"key": v}} {
			resp, err := cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: roleReadOnly, Metadata: md})
			check(t, "IssueCredential.metadata", v, err, codes.OK, codes.InvalidArgument)
			if err == nil {
				// Legitimate data: stored as given, never interpreted.
				got := resp.GetLease().GetMetadata()
				for k, val := range md {
					if got[k] != val {
						t.Errorf("metadata %q: stored %q, sent %q", k, got[k], val)
					}
				}
				if _, err := cred.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: resp.GetLease().GetId()}); err != nil {
					t.Fatalf("revoke the lease issued with metadata %q: %v", md, err)
				}
			}
		}

		_, err = cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: v})
		check(t, "RenewLease.lease_id", v, err, bad...)
		_, err = cred.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: v})
		check(t, "RevokeLease.lease_id", v, err, bad...)
		_, err = cred.LookupLease(ctx, &pb.LookupLeaseRequest{LeaseId: v})
		check(t, "LookupLease.lease_id", v, err, bad...)

		list, err := admin.ListLeases(ctx, &pb.ListLeasesRequest{Role: v})
		check(t, "ListLeases.role", v, err, codes.OK, codes.InvalidArgument)
		if err == nil && v != "" && len(list.GetLeases()) != 0 {
			t.Errorf("ListLeases.role = %q matched %d leases", v, len(list.GetLeases()))
		}
		list, err = admin.ListLeases(ctx, &pb.ListLeasesRequest{Client: v})
		check(t, "ListLeases.client", v, err, codes.OK, codes.InvalidArgument)
		if err == nil && v != "" && len(list.GetLeases()) != 0 {
			t.Errorf("ListLeases.client = %q matched %d leases", v, len(list.GetLeases()))
		}
		if v != "" {
			_, err = admin.ListLeases(ctx, &pb.ListLeasesRequest{PageToken: v})
			check(t, "ListLeases.page_token", v, err, codes.InvalidArgument)
		}

		rv, err := admin.RevokeLeases(ctx, &pb.RevokeLeasesRequest{LeaseIds: []string{v}})
		check(t, "RevokeLeases.lease_ids", v, err, bad...)
		if err == nil && rv.GetRevokedCount() != 0 {
			t.Errorf("RevokeLeases.lease_ids = %q revoked %d leases", v, rv.GetRevokedCount())
		}
		for _, req := range []*pb.RevokeLeasesRequest{{Role: v}, {Client: v}} {
			rv, err = admin.RevokeLeases(ctx, req)
			check(t, "RevokeLeases.role/client", v, err, codes.OK, codes.InvalidArgument)
			if err == nil && rv.GetRevokedCount() != 0 {
				t.Errorf("RevokeLeases %v revoked %d leases", req, rv.GetRevokedCount())
			}
		}
	}

	t.Run("KeepAlive", func(t *testing.T) {
		stream, err := cred.KeepAlive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var sent []string
		for _, v := range injectionCorpus {
			if utf8.ValidString(v) {
				if err := stream.Send(&pb.KeepAliveRequest{LeaseId: v}); err != nil {
					t.Fatal(err)
				}
				sent = append(sent, v)
			}
		}
		for range sent {
			resp, err := stream.Recv()
			if err != nil {
				t.Fatalf("the stream broke on the corpus: %v", err)
			}
			if resp.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND {
				t.Errorf("KeepAlive answered %v for a corpus id, want NOT_FOUND", resp.GetEvent())
			}
		}
		// The stream still works for a real lease.
		if err := stream.Send(&pb.KeepAliveRequest{LeaseId: real.GetLease().GetId()}); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil || resp.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
			t.Errorf("KeepAlive of the real lease after the corpus: %v, %v", resp, err)
		}
		stream.CloseSend()
	})

	t.Run("invalid UTF-8 on the wire", func(t *testing.T) {
		// Protobuf decoding refuses these before any handler runs; gRPC
		// reports that as Internal with a message that says what is wrong.
		for _, tc := range []struct {
			method string
			field  protowire.Number
		}{
			{"/credbroker.v1.CredentialService/IssueCredential", 1},
			{"/credbroker.v1.CredentialService/RenewLease", 1},
			{"/credbroker.v1.CredentialService/RevokeLease", 1},
			{"/credbroker.v1.CredentialService/LookupLease", 1},
			{"/credbroker.v1.AdminService/ListLeases", 1},
			{"/credbroker.v1.AdminService/ListLeases", 2},
			{"/credbroker.v1.AdminService/ListLeases", 5},
			{"/credbroker.v1.AdminService/RevokeLeases", 1},
			{"/credbroker.v1.AdminService/RevokeLeases", 2},
			{"/credbroker.v1.AdminService/RevokeLeases", 3},
		} {
			for _, v := range injectionCorpus {
				if utf8.ValidString(v) {
					continue
				}
				var out []byte
				err := rawConn.Invoke(ctx, tc.method, rawString(tc.field, v), &out, grpc.ForceCodec(rawCodec{}))
				if err == nil || !strings.Contains(status.Convert(err).Message(), "invalid UTF-8") {
					t.Errorf("%s field %d = %q: %v; want a refusal naming invalid UTF-8", tc.method, tc.field, v, err)
				}
			}
		}
	})

	after := snapshotRoles(t, ctx, h)
	if !slices.Equal(before.roles, after.roles) {
		t.Errorf("pg_roles changed:\nbefore %v\nafter  %v", before.roles, after.roles)
	}
	if !slices.Equal(before.managed, after.managed) {
		t.Errorf("marker-role members changed:\nbefore %v\nafter  %v", before.managed, after.managed)
	}
	if l, err := h.broker.Lookup(ctx, real.GetLease().GetId()); err != nil || l.State.String() != "active" {
		t.Errorf("the real lease after the corpus: %v, %v", l.State, err)
	}
}
