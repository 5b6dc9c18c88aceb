package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// markerMembers lists the users of the target's marker role but the
// broker's admin (granted it WITH ADMIN OPTION), sorted.
func (f *reloadFixture) markerMembers(ctx context.Context) []string {
	f.t.Helper()
	conn, err := pgx.Connect(ctx, f.tg.SuperURL)
	if err != nil {
		f.t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT r.rolname FROM pg_roles r
		JOIN pg_auth_members m ON m.member = r.oid
		JOIN pg_roles mr ON mr.oid = m.roleid
		WHERE mr.rolname = $1 AND r.rolname <> $2 ORDER BY 1`, f.tg.MarkerRole, f.tg.AdminUser)
	if err != nil {
		f.t.Fatal(err)
	}
	users, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		f.t.Fatal(err)
	}
	return users
}

// backup streams BackupStore into path, as brokerctl backup does.
func (f *reloadFixture) backup(path string) (format string) {
	f.t.Helper()
	stream, err := f.admins.BackupStore(f.admin, &pb.BackupStoreRequest{})
	if err != nil {
		f.t.Fatal(err)
	}
	out, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		f.t.Fatal(err)
	}
	defer out.Close()
	var written, size int64
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			f.t.Fatalf("backup: %v", err)
		}
		if msg.GetFormat() != "" {
			format = msg.GetFormat()
		}
		size += msg.GetSize()
		n, err := out.Write(msg.GetData())
		if err != nil {
			f.t.Fatal(err)
		}
		written += int64(n)
	}
	if written == 0 || written != size {
		f.t.Fatalf("backup: %d bytes received, size %d", written, size)
	}
	return format
}

// TestRestoreFromABackupSettlesWithoutRecreating: issue, back up, issue
// more, revoke one lease from before the backup, stop, restore the
// backup, start. The start-up reconciliation drops the user issued after
// the backup (no lease knows it), ends the lease whose user was dropped
// after the backup (REVOKED, once, not a revocation failing in a loop),
// keeps the lease that is still good, and creates no user.
func TestRestoreFromABackupSettlesWithoutRecreating(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f := newReloadFixture(t, ctx, func(ro string) string {
		return fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 10m, max_ttl: 1h, allowed: ["svc-*"]}
`, ro)
	})
	issue := func() *pb.IssueCredentialResponse {
		t.Helper()
		r, err := f.creds.IssueCredential(f.svc, &pb.IssueCredentialRequest{Role: "read_only"})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	revokedLater, kept := issue(), issue()

	backup := filepath.Join(t.TempDir(), "leases.backup")
	if format := f.backup(backup); format != FormatBBolt {
		t.Errorf("backup format = %q, want %q", format, FormatBBolt)
	}
	issuedLater := issue()
	if _, err := f.creds.RevokeLease(f.svc, &pb.RevokeLeaseRequest{LeaseId: revokedLater.GetLease().GetId()}); err != nil {
		t.Fatal(err)
	}
	want := []string{kept.GetCredential().GetUsername(), issuedLater.GetCredential().GetUsername()}
	slices.Sort(want)
	if got := f.markerMembers(ctx); !slices.Equal(got, want) {
		t.Fatalf("users before the restore = %q, want %q", got, want)
	}

	// Restore: brokerd stopped, the backup put at store.path.
	storePath := f.d.cfg.Store.Path
	f.stop()
	data, err := os.ReadFile(backup)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(storePath, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f.start(ctx) // reconciles at start-up

	if got, want := f.markerMembers(ctx), []string{kept.GetCredential().GetUsername()}; !slices.Equal(got, want) {
		t.Errorf("users after the restore = %q, want only %q (the one issued after the backup dropped, none re-created)", got, want)
	}
	l, err := f.creds.LookupLease(f.svc, &pb.LookupLeaseRequest{LeaseId: revokedLater.GetLease().GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if l.GetLease().GetState() != pb.LeaseState_LEASE_STATE_REVOKED || l.GetLease().GetLastError() != "" {
		t.Errorf("lease revoked after the backup: state %v, last_error %q; want REVOKED without an error", l.GetLease().GetState(), l.GetLease().GetLastError())
	}
	l, err = f.creds.LookupLease(f.svc, &pb.LookupLeaseRequest{LeaseId: kept.GetLease().GetId()})
	if err != nil || l.GetLease().GetState() != pb.LeaseState_LEASE_STATE_ACTIVE {
		t.Errorf("lease kept: %v, %v; want ACTIVE", l.GetLease().GetState(), err)
	}
	if _, err := f.creds.LookupLease(f.svc, &pb.LookupLeaseRequest{LeaseId: issuedLater.GetLease().GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("lease issued after the backup: %v, want NotFound", err)
	}
	// Settled once: the next reconciliation has nothing to do.
	res, err := f.d.Broker().Reconcile(ctx)
	if err != nil || res.LeasesSettled != 0 || res.UsersDropped != 0 || res.IntentsSettled != 0 {
		t.Errorf("second reconciliation = %+v, %v; want nothing to do", res, err)
	}
	if got := f.markerMembers(ctx); len(got) != 1 {
		t.Errorf("users after the second reconciliation = %q", got)
	}
	// The kept credential still renews.
	if _, err := f.creds.RenewLease(f.svc, &pb.RenewLeaseRequest{LeaseId: kept.GetLease().GetId()}); err != nil {
		t.Errorf("renew the kept lease after the restore: %v", err)
	}
}
