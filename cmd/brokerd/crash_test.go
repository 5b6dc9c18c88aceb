package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// childEnv makes the test binary run brokerd's main (see TestMain).
const childEnv = "CREDBROKER_TEST_BROKERD_CHILD"

// TestKillNineLeavesNoOrphan runs brokerd as a real process, issues and
// revokes credentials from several clients at once, and kills brokerd
// with SIGKILL at an arbitrary moment, several times over, on one store
// file. After a final restart: every member of the marker role has a live
// lease, and every credential a client received has a lease.
func TestKillNineLeavesNoOrphan(t *testing.T) {
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	c := writeConfig(t, addr, "")

	type received struct{ leaseID, username string }
	var (
		mu  sync.Mutex
		got []received
	)
	const rounds = 8
	for round := range rounds {
		proc := startBrokerd(t, c.path)
		conn := dial(t, addr)
		waitServing(t, conn)
		client := credbrokerv1.NewCredentialServiceClient(conn)

		// Kill after a random number of successful issues, while eight
		// clients keep issuing and revoking: the kill lands wherever the
		// requests in flight happen to be.
		killAfter := int64(3 + rand.IntN(12))
		var issued atomic.Int64
		reached := make(chan struct{})
		ctx, cancel := context.WithCancel(context.Background())
		var clients sync.WaitGroup
		for w := range 8 {
			clients.Add(1)
			go func() {
				defer clients.Done()
				for i := 0; ctx.Err() == nil; i++ {
					resp, err := client.IssueCredential(ctx, &credbrokerv1.IssueCredentialRequest{Role: "read_only"})
					if err != nil {
						continue // the broker is dying or dead
					}
					mu.Lock()
					got = append(got, received{resp.GetLease().GetId(), resp.GetCredential().GetUsername()})
					mu.Unlock()
					if issued.Add(1) == killAfter {
						close(reached)
					}
					if (w+i)%2 == 0 {
						_, _ = client.RevokeLease(ctx, &credbrokerv1.RevokeLeaseRequest{LeaseId: resp.GetLease().GetId()})
					}
				}
			}()
		}
		select {
		case <-reached:
		case <-time.After(60 * time.Second):
			t.Fatalf("round %d: %d issues did not happen within a minute", round, killAfter)
		}
		if err := proc.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatalf("kill: %v", err)
		}
		_ = proc.Wait()
		cancel()
		clients.Wait()
	}

	// Final start: start-up reconciliation and expiry settle what the kills
	// left behind before brokerd reports SERVING.
	proc := startBrokerd(t, c.path)
	conn := dial(t, addr)
	waitServing(t, conn)
	client := credbrokerv1.NewCredentialServiceClient(conn)
	admin := credbrokerv1.NewAdminServiceClient(conn)

	live := map[string]bool{}
	var token string
	for {
		resp, err := admin.ListLeases(context.Background(), &credbrokerv1.ListLeasesRequest{PageSize: 1000, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range resp.GetLeases() {
			switch l.GetState() {
			case credbrokerv1.LeaseState_LEASE_STATE_ACTIVE, credbrokerv1.LeaseState_LEASE_STATE_REVOKING, credbrokerv1.LeaseState_LEASE_STATE_REVOKE_FAILED:
				live[l.GetUsername()] = true
			}
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	for _, u := range markerMembers(t, c) {
		if !live[u] {
			t.Errorf("orphan: user %s exists with no live lease", u)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) < rounds*3 {
		t.Fatalf("only %d credentials were issued; the test exercised too little", len(got))
	}
	for _, r := range got {
		if _, err := client.LookupLease(context.Background(), &credbrokerv1.LookupLeaseRequest{LeaseId: r.leaseID}); err != nil {
			t.Errorf("credential %s was handed out but its lease is unknown: %v", r.username, err)
		}
	}
	t.Logf("%d credentials issued over %d kills; %d users live at the end", len(got), rounds, len(live))
	_ = proc.Process.Signal(syscall.SIGTERM)
	if err := proc.Wait(); err != nil {
		t.Errorf("brokerd exit after SIGTERM: %v", err)
	}
}

func startBrokerd(t *testing.T, configPath string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "--config", configPath)
	cmd.Env = append(os.Environ(), childEnv+"=1")
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		if t.Failed() {
			t.Logf("brokerd output:\n%s", out.String())
		}
		if strings.Contains(out.String(), "password=") {
			t.Error("brokerd logged a password attribute")
		}
	})
	return cmd
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// markerMembers lists, as superuser, the issued users of the target:
// members of its marker role without ADMIN OPTION (the admin is a member
// with ADMIN OPTION).
func markerMembers(t *testing.T, c testConfig) []string {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), c.target.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(context.Background(), `SELECT m.rolname FROM pg_auth_members am
		JOIN pg_roles r ON r.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
		WHERE r.rolname = $1 AND NOT am.admin_option`, c.target.MarkerRole)
	if err != nil {
		t.Fatal(err)
	}
	users, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return users
}
