package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// freeLoopback returns a loopback address that was free a moment ago.
func freeLoopback(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestDevHA runs `brokerd dev --ha` end to end: both instances issue
// working credentials from one store, the survivor serves after the
// other is killed with SIGKILL, Enter starts it again, and Ctrl-C leaves
// no process and no file behind.
func TestDevHA(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL, three etcd members and two brokerd")
	}
	if _, err := etcdcluster.FindBinary(); err != nil {
		t.Skip(err)
	}
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	enterR, enterW := io.Pipe()
	defer enterW.Close()
	ready := make(chan *devHASession, 1)
	done := make(chan error, 1)
	listens := []string{freeLoopback(t), freeLoopback(t)}
	go func() {
		done <- runDevHA(ctx, listens, devHAOptions{Bin: bin, Env: []string{childEnv + "=1"}, Stdin: enterR},
			&stdout, &stderr, func(s *devHASession) { ready <- s })
	}()
	var s *devHASession
	select {
	case s = <-ready:
	case err := <-done:
		t.Fatalf("brokerd dev --ha failed: %v\n%s", err, stderr.String())
	case <-time.After(4 * time.Minute):
		t.Fatalf("brokerd dev --ha not ready:\n%s", stderr.String())
	}
	a, b := s.Instances[0], s.Instances[1]
	walk := stdout.String()
	for _, want := range []string{
		"--addr " + a.Listen + " issue read_only", "--addr " + b.Listen + " issue read_only",
		"--addr " + a.Listen + " status", "Press Enter", "Ctrl-C",
	} {
		if !strings.Contains(walk, want) {
			t.Errorf("walk-through lacks %q:\n%s", want, walk)
		}
	}

	callCtx, callCancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer callCancel()
	issue := func(in *devInstance) *credbrokerv1.IssueCredentialResponse {
		t.Helper()
		resp, err := credbrokerv1.NewCredentialServiceClient(dial(t, "passthrough:///"+in.Listen)).
			IssueCredential(callCtx, &credbrokerv1.IssueCredentialRequest{Role: "read_only"})
		if err != nil {
			t.Fatalf("issue on %s: %v", in.Name, err)
		}
		pc, err := pgx.Connect(callCtx, resp.GetCredential().GetDsn())
		if err != nil {
			t.Fatalf("login with %s's credential: %v", in.Name, err)
		}
		defer pc.Close(callCtx)
		if _, err := pc.Exec(callCtx, "SELECT count(*) FROM important_table"); err != nil {
			t.Fatalf("%s's credential: %v", in.Name, err)
		}
		return resp
	}
	fromA := issue(a)
	issue(b)
	// One store: b sees a's lease.
	got, err := credbrokerv1.NewCredentialServiceClient(dial(t, "passthrough:///"+b.Listen)).
		LookupLease(callCtx, &credbrokerv1.LookupLeaseRequest{LeaseId: fromA.GetLease().GetId()})
	if err != nil || got.GetLease().GetUsername() != fromA.GetLease().GetUsername() {
		t.Fatalf("b looking up a's lease: %v, %v", got, err)
	}

	// Kill whichever instance leads; the other must lead within the
	// session TTL (plus room for a loaded machine).
	st, err := etcd.Open(callCtx, etcd.Options{Endpoints: s.Etcd.Endpoints(), Prefix: etcd.DefaultPrefix, DialTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	leader := func() string {
		gs, err := st.GroupStatus(callCtx)
		if err != nil {
			return ""
		}
		return gs.Leader
	}
	waitFor(t, time.Minute, func() bool { return leader() != "" }, "a leader")
	victim, survivor := a, b
	if leader() == b.Name {
		victim, survivor = b, a
	}
	pidV := victim.Pid()
	if want := fmt.Sprintf("Kill the leader, %s now, as a crash would:\n       kill -9 %d", victim.Name, pidV); !strings.Contains(walk, want) {
		t.Errorf("walk-through does not name the leader: lacks %q:\n%s", want, walk)
	}
	if err := syscall.Kill(pidV, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	waitFor(t, devHASessionTTL+30*time.Second, func() bool { return leader() == survivor.Name }, survivor.Name+" to lead")
	t.Logf("%s leads %s after %s was killed", survivor.Name, time.Since(killed).Round(time.Millisecond), victim.Name)
	waitFor(t, 30*time.Second, func() bool { return strings.Contains(stdout.String(), victim.Name+" exited") }, "dev to notice the death")
	issue(survivor)
	// Enter starts it again.
	if _, err := enterW.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Minute, func() bool { return strings.Contains(stdout.String(), victim.Name+" serves again") }, victim.Name+" to serve again")
	if victim.Pid() == 0 || victim.Pid() == pidV {
		t.Fatalf("%s pid %d after restart (was %d)", victim.Name, victim.Pid(), pidV)
	}
	issue(victim)
	if l := leader(); l != survivor.Name {
		t.Errorf("after %s came back, %q leads; want %s to keep leading", victim.Name, l, survivor.Name)
	}

	pids := []int{a.Pid(), b.Pid()}
	for _, m := range s.Etcd.Members {
		pids = append(pids, m.Pid())
	}
	etcdDir := s.Etcd.Dir
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("brokerd dev --ha: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("brokerd dev --ha did not stop")
	}
	for _, p := range pids {
		if p == 0 || syscall.Kill(p, 0) == nil {
			t.Errorf("pid %d: not started, or still running after Ctrl-C", p)
		}
	}
	for _, p := range []string{s.Dir, etcdDir, s.Cluster.DataDir} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
	if !strings.Contains(stderr.String(), `msg="revoked leases at shutdown" count=4`) {
		t.Errorf("leases not revoked at shutdown:\n%s", stderr.String())
	}
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
