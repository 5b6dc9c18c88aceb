package credbroker_test

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/clients/credbroker"
	"github.com/credbroker/credbroker/internal/brokertest"
	"github.com/credbroker/credbroker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, b *brokertest.Broker) *credbroker.Client {
	t.Helper()
	c, err := credbroker.Dial(b.Addr, credbroker.WithReconnectBackoff(credbroker.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// login opens a session with the credential and runs a query on it.
func login(ctx context.Context, c credbroker.Credential) error {
	conn, err := pgx.Connect(ctx, c.DSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var one int
	return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
}

func TestUnaryCallsKeepGRPCCodes(t *testing.T) {
	ctx := testContext(t)
	b := brokertest.Start(t, brokertest.Options{})
	c := dial(t, b)

	l, cred, err := c.Issue(ctx, credbroker.IssueRequest{Role: "read_only", TTL: 5 * time.Minute, Metadata: map[string]string{"app": "test"}})
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	if l.ID == "" || l.State != credbroker.StateActive || cred.Username != l.Username || cred.Password == "" || cred.DSN == "" {
		t.Fatalf("Issue returned lease %+v, credential %v", l, cred)
	}
	if s := cred.String(); s == "" || contains(s, cred.Password) {
		t.Errorf("Credential.String shows the password: %q", s)
	}
	if err := login(ctx, cred); err != nil {
		t.Fatalf("login with the issued credential: %v", err)
	}
	got, err := c.Lookup(ctx, l.ID)
	if err != nil || got.ID != l.ID || got.Metadata["app"] != "test" {
		t.Fatalf("Lookup = %+v, %v", got, err)
	}
	renewed, err := c.Renew(ctx, l.ID, 20*time.Minute)
	if err != nil || !renewed.ExpireTime.After(l.ExpireTime) {
		t.Fatalf("Renew = %v, %v; want expiry after %v", renewed.ExpireTime, err, l.ExpireTime)
	}
	roles, err := c.ListRoles(ctx)
	if err != nil || len(roles) != 1 || roles[0].Name != "read_only" || roles[0].MaxTTL != time.Hour {
		t.Fatalf("ListRoles = %+v, %v", roles, err)
	}
	leases, next, err := c.ListLeases(ctx, credbroker.LeaseFilter{Role: "read_only"})
	if err != nil || len(leases) != 1 || next != "" {
		t.Fatalf("ListLeases = %d leases, %q, %v", len(leases), next, err)
	}
	revoked, err := c.Revoke(ctx, l.ID)
	if err != nil || revoked.State != credbroker.StateRevoked {
		t.Fatalf("Revoke = %v, %v", revoked.State, err)
	}
	if err := login(ctx, cred); err == nil {
		t.Fatal("the revoked credential still logs in")
	}

	tests := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"unknown role", func() error { _, _, err := c.Issue(ctx, credbroker.IssueRequest{Role: "nope"}); return err }, codes.NotFound},
		{"negative ttl", func() error {
			_, _, err := c.Issue(ctx, credbroker.IssueRequest{Role: "read_only", TTL: -time.Second})
			return err
		}, codes.InvalidArgument},
		{"unknown lease", func() error { _, err := c.Lookup(ctx, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"); return err }, codes.NotFound},
		{"renew revoked", func() error { _, err := c.Renew(ctx, l.ID, 0); return err }, codes.FailedPrecondition},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := status.Code(tt.call()); got != tt.want {
				t.Errorf("code %v, want %v", got, tt.want)
			}
		})
	}
	if _, err := c.RevokeLeases(ctx, credbroker.RevokeSelector{}); err == nil {
		t.Error("RevokeLeases with no selector succeeded")
	}
}

func contains(s, sub string) bool {
	return len(sub) > 0 && len(s) >= len(sub) && (s == sub || indexOf(s, sub) >= 0)
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

// nextEvent waits for the first event of one of the given types, failing
// the test at the deadline. Other events are skipped (and recorded).
func nextEvent(t *testing.T, k *credbroker.Keeper, deadline time.Duration, types ...credbroker.EventType) (credbroker.Event, []credbroker.Event) {
	t.Helper()
	timeout := time.After(deadline)
	var skipped []credbroker.Event
	for {
		select {
		case ev := <-k.Events():
			for _, want := range types {
				if ev.Type == want {
					return ev, skipped
				}
			}
			skipped = append(skipped, ev)
		case <-timeout:
			t.Fatalf("no %v event within %v (saw %v)", types, deadline, eventTypes(skipped))
		}
	}
}

func eventTypes(evs []credbroker.Event) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.Type.String())
	}
	return out
}

func startKeeper(t *testing.T, c *credbroker.Client, opts credbroker.KeeperOptions) *credbroker.Keeper {
	t.Helper()
	k := c.NewKeeper(opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Keeper.Run returned %v, want context.Canceled", err)
		}
	})
	select {
	case <-k.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("the keeper got no credential")
	}
	return k
}

// TestKeeperSurvivesBrokerRestart: the broker restarts under a keeper;
// the keeper reconnects, the same lease is renewed, and no new credential
// is issued.
func TestKeeperSurvivesBrokerRestart(t *testing.T) {
	ctx := testContext(t)
	b := brokertest.Start(t, brokertest.Options{})
	c := dial(t, b)
	k := startKeeper(t, c, credbroker.KeeperOptions{Issue: credbroker.IssueRequest{Role: "read_only"}})
	first, cred, _ := k.Current()
	nextEvent(t, k, 10*time.Second, credbroker.EventIssued)
	nextEvent(t, k, 10*time.Second, credbroker.EventReconnected)

	b.Restart()
	_, skipped := nextEvent(t, k, 20*time.Second, credbroker.EventDisconnected)
	ev, more := nextEvent(t, k, 20*time.Second, credbroker.EventReconnected)
	_ = ev
	renewed, more2 := nextEvent(t, k, 20*time.Second, credbroker.EventRenewed)
	for _, e := range append(append(skipped, more...), more2...) {
		if e.Type == credbroker.EventIssued || e.Type == credbroker.EventReplaced {
			t.Fatalf("a new credential was issued across the restart: %v", e.Type)
		}
	}
	if renewed.Lease.ID != first.ID {
		t.Fatalf("renewed lease %s, want the original %s", renewed.Lease.ID, first.ID)
	}
	if now, _, _ := k.Current(); now.ID != first.ID {
		t.Fatalf("current lease %s after restart, want %s", now.ID, first.ID)
	}
	if err := login(ctx, cred); err != nil {
		t.Fatalf("the original credential stopped working: %v", err)
	}
}

// TestKeeperRevokedIssuesFresh: an admin revokes the keeper's lease; the
// keeper hears REVOKED on the stream and issues a fresh credential.
func TestKeeperRevokedIssuesFresh(t *testing.T) {
	ctx := testContext(t)
	b := brokertest.Start(t, brokertest.Options{})
	c := dial(t, b)
	k := startKeeper(t, c, credbroker.KeeperOptions{Issue: credbroker.IssueRequest{Role: "read_only"}})
	first, _, _ := k.Current()
	nextEvent(t, k, 10*time.Second, credbroker.EventRenewed) // the stream names it

	n, err := c.RevokeLeases(ctx, credbroker.RevokeSelector{LeaseIDs: []string{first.ID}})
	if err != nil || n != 1 {
		t.Fatalf("RevokeLeases = %d, %v", n, err)
	}
	ev, _ := nextEvent(t, k, 5*time.Second, credbroker.EventRevoked)
	if ev.Lease.ID != first.ID {
		t.Fatalf("REVOKED for %s, want %s", ev.Lease.ID, first.ID)
	}
	fresh, _ := nextEvent(t, k, 20*time.Second, credbroker.EventIssued)
	if fresh.Lease.ID == first.ID || fresh.Credential == nil {
		t.Fatalf("fresh credential %+v", fresh)
	}
	if err := login(ctx, *fresh.Credential); err != nil {
		t.Fatalf("the fresh credential does not log in: %v", err)
	}
}

// TestKeeperReplacesBeforeMaxTTL: on a role with a max TTL of a few
// seconds, the successor is issued before the old lease expires and the
// old one keeps working through the overlap, then is revoked.
func TestKeeperReplacesBeforeMaxTTL(t *testing.T) {
	ctx := testContext(t)
	b := brokertest.Start(t, brokertest.Options{Roles: []brokertest.Role{{Name: "short", DefaultTTL: 6 * time.Second, MaxTTL: 6 * time.Second}}})
	c := dial(t, b)
	k := startKeeper(t, c, credbroker.KeeperOptions{
		Issue:         credbroker.IssueRequest{Role: "short"},
		Overlap:       2 * time.Second,
		ReplaceBefore: 3 * time.Second,
	})
	first, oldCred, _ := k.Current()
	repl, before := nextEvent(t, k, 20*time.Second, credbroker.EventReplaced)
	sawMax := false
	for _, ev := range before {
		sawMax = sawMax || (ev.Type == credbroker.EventMaxTTLReached && ev.Lease.ID == first.ID)
	}
	if !sawMax {
		// Issued at its max TTL, the lease cannot grow: the broker says so
		// on the first renewal, long before the replacement.
		t.Errorf("no MAX_TTL_REACHED for %s before the replacement (saw %v)", first.ID, eventTypes(before))
	}
	if repl.Old == nil || repl.Old.ID != first.ID || repl.Credential == nil || repl.Lease.ID == first.ID {
		t.Fatalf("replacement event %+v", repl)
	}
	if !repl.Lease.IssueTime.Before(first.MaxExpireTime) {
		t.Fatalf("successor issued at %v, not before the old lease's max expiry %v", repl.Lease.IssueTime, first.MaxExpireTime)
	}
	// Make-before-break: the old credential still works while the
	// overlap lasts (it is retired only after the event below).
	if err := login(ctx, oldCred); err != nil {
		t.Fatalf("the old credential stopped working before it was retired: %v", err)
	}
	if err := login(ctx, *repl.Credential); err != nil {
		t.Fatalf("the new credential does not log in: %v", err)
	}
	ret, _ := nextEvent(t, k, 20*time.Second, credbroker.EventRetired)
	if ret.Lease.ID != first.ID {
		t.Fatalf("retired %s, want %s", ret.Lease.ID, first.ID)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		l, err := c.Lookup(ctx, first.ID)
		if err == nil && l.State.String() != "LEASE_STATE_ACTIVE" && l.State != credbroker.StateRevoking {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the retired lease is still %v", l.State)
		}
		select {
		case <-k.Events():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestRevokeOnDisconnect: two revoke_on_disconnect leases; the client of
// one goes away. Its lease is revoked (and its user dropped) after the
// grace period, while the lease whose stream stayed open lives on: both
// had the same time to be revoked.
func TestRevokeOnDisconnect(t *testing.T) {
	ctx := testContext(t)
	b := brokertest.Start(t, brokertest.Options{DisconnectGrace: 2 * time.Second})
	stays := dial(t, b)
	kStays := startKeeper(t, stays, credbroker.KeeperOptions{Issue: credbroker.IssueRequest{Role: "read_only", RevokeOnDisconnect: true}})
	kept, keptCred, _ := kStays.Current()
	if !kept.RevokeOnDisconnect {
		t.Fatal("the lease is not revoke_on_disconnect")
	}
	nextEvent(t, kStays, 10*time.Second, credbroker.EventRenewed)

	goes, err := credbroker.Dial(b.Addr)
	if err != nil {
		t.Fatal(err)
	}
	kGoes := goes.NewKeeper(credbroker.KeeperOptions{Issue: credbroker.IssueRequest{Role: "read_only", RevokeOnDisconnect: true}})
	runCtx, cancel := context.WithCancel(context.Background())
	runDone := make(chan struct{})
	go func() { defer close(runDone); _ = kGoes.Run(runCtx) }()
	<-kGoes.Ready()
	nextEvent(t, kGoes, 10*time.Second, credbroker.EventRenewed)
	gone, goneCred, _ := kGoes.Current()
	// The sidecar dies: its stream ends, and nobody revokes.
	closedAt := time.Now()
	cancel()
	<-runDone
	_ = goes.Close()

	deadline := time.Now().Add(30 * time.Second)
	for {
		l, err := stays.Lookup(ctx, gone.ID)
		if err != nil {
			t.Fatal(err)
		}
		if l.State == credbroker.StateRevoked {
			// Not before the grace period: the stream closed after
			// closedAt, and the grace runs from then.
			if l.EndTime.Before(closedAt.Add(2 * time.Second)) {
				t.Fatalf("revoked at %v, before the 2s grace after the stream closed at %v", l.EndTime, closedAt)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease of the vanished client is still %v", l.State)
		}
		select {
		case <-kStays.Events():
		case <-time.After(50 * time.Millisecond):
		}
	}
	if ok, err := b.RoleExists(ctx, goneCred.Username); err != nil || ok {
		t.Fatalf("user of the vanished client exists: %v, %v", ok, err)
	}
	l, err := stays.Lookup(ctx, kept.ID)
	if err != nil || l.State != credbroker.StateActive {
		t.Fatalf("the lease whose stream stayed open is %v, %v", l.State, err)
	}
	if err := login(ctx, keptCred); err != nil {
		t.Fatalf("the kept credential stopped working: %v", err)
	}
}

// TestKeeperWaitsForABrokerThatIsDown: started while the broker is down,
// the keeper reports the failed issue, retries with backoff, and gets its
// credential once the broker is up.
func TestKeeperWaitsForABrokerThatIsDown(t *testing.T) {
	ctx := testContext(t)
	b := brokertest.Start(t, brokertest.Options{})
	b.Stop()
	c := dial(t, b)
	k := c.NewKeeper(credbroker.KeeperOptions{
		Issue:   credbroker.IssueRequest{Role: "read_only"},
		Backoff: credbroker.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond},
	})
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- k.Run(runCtx) }()
	defer func() { cancel(); <-done }()

	ev, _ := nextEvent(t, k, 10*time.Second, credbroker.EventError)
	if status.Code(ev.Err) != codes.Unavailable {
		t.Fatalf("issue against a stopped broker: %v, want Unavailable", ev.Err)
	}
	if _, _, ok := k.Current(); ok {
		t.Fatal("a credential without a broker")
	}
	b.Restart()
	issued, _ := nextEvent(t, k, 30*time.Second, credbroker.EventIssued)
	if err := login(ctx, *issued.Credential); err != nil {
		t.Fatalf("the credential issued after the broker came up does not log in: %v", err)
	}
	select {
	case <-k.Ready():
	default:
		t.Fatal("Ready is not closed after the first credential")
	}
}

// TestKeeperStopsOnPermanentError: with StopOnPermanentError, a role the
// broker does not know ends Run with the broker's NotFound; without it the
// Keeper goes on retrying. A broker that is down is not permanent.
func TestKeeperStopsOnPermanentError(t *testing.T) {
	ctx := testContext(t)
	b := brokertest.Start(t, brokertest.Options{})
	c := dial(t, b)
	for _, stop := range []bool{true, false} {
		k := c.NewKeeper(credbroker.KeeperOptions{
			Issue:                credbroker.IssueRequest{Role: "no_such_role"},
			Backoff:              credbroker.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond},
			StopOnPermanentError: stop,
		})
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- k.Run(runCtx) }()
		if stop {
			select {
			case err := <-done:
				if status.Code(err) != codes.NotFound {
					t.Fatalf("Run = %v, want NotFound", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Run went on after a permanent error")
			}
			cancel()
			continue
		}
		nextEvent(t, k, 10*time.Second, credbroker.EventError)
		nextEvent(t, k, 10*time.Second, credbroker.EventError) // a retry
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("Run = %v, want context.Canceled", err)
		}
	}

	for code, want := range map[codes.Code]bool{
		codes.NotFound: true, codes.PermissionDenied: true, codes.InvalidArgument: true,
		codes.Unauthenticated: true, codes.Unimplemented: true,
		codes.Unavailable: false, codes.DeadlineExceeded: false, codes.ResourceExhausted: false,
		codes.Aborted: false, codes.Internal: false, codes.Canceled: false, codes.Unknown: false,
	} {
		if got := credbroker.IsPermanent(status.Error(code, "x")); got != want {
			t.Errorf("IsPermanent(%v) = %v, want %v", code, got, want)
		}
	}
	if credbroker.IsPermanent(errors.New("not a status")) {
		t.Error("IsPermanent of a plain error")
	}
}
