package daemon

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/internal/pgtest"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// reloadFixture is a broker started from a configuration file, served
// over loopback gRPC, with an admin and a service token.
type reloadFixture struct {
	t      *testing.T
	d      *Daemon
	stop   func() // stops serving and closes d
	tg     *pgtest.Target
	path   string
	head   string // listen, metrics, store, targets
	ro     string // the read_only proxy role
	admin  context.Context
	svc    context.Context
	creds  pb.CredentialServiceClient
	admins pb.AdminServiceClient
}

const (
	reloadAdminToken = "token-reload-admin-0123456789"
	reloadSvcToken   = "token-reload-svc-0123456789"
)

// write writes the configuration file: the fixed head, the tokens, then
// roles.
func (f *reloadFixture) write(roles string) {
	f.t.Helper()
	body := f.head + fmt.Sprintf(`admins: [ops-admin]
tokens:
  - {identity: ops-admin, sha256: %s}
  - {identity: svc-orders, sha256: %s}
`, server.TokenHash(reloadAdminToken), server.TokenHash(reloadSvcToken)) + roles
	if err := os.WriteFile(f.path, []byte(body), 0o600); err != nil {
		f.t.Fatal(err)
	}
}

func newReloadFixture(t *testing.T, ctx context.Context, roles func(ro string) string) *reloadFixture {
	t.Helper()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f := &reloadFixture{t: t, tg: tg, path: filepath.Join(dir, "credbroker.yaml"), ro: tg.ProxyRoles["read_only"]}
	// The port is fixed after the first start: a reload that kept
	// "127.0.0.1:0" would be no change, so the test's file names it.
	f.head = fmt.Sprintf(`listen: 127.0.0.1:0
metrics: {listen: 127.0.0.1:0}
store: {path: %q}
targets:
  - {name: main, url: %q, password_file: %q, marker_role: %s, connect_timeout: 5s}
`, filepath.Join(dir, "leases.db"), tg.AdminURL, pw, tg.MarkerRole)
	f.write(roles(f.ro))
	f.start(ctx)
	return f
}

// start starts a broker from the file and serves it until stop (or the
// test's end).
func (f *reloadFixture) start(ctx context.Context) {
	t := f.t
	t.Helper()
	file, err := config.Load(f.path)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := file.Validate()
	if err != nil {
		t.Fatal(err)
	}
	opts := testOptions()
	opts.ConfigPath = f.path
	d, err := Start(ctx, cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	f.d = d
	serveCtx, stopServing := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- d.Serve(serveCtx) }()
	<-d.Ready()
	conn, err := grpc.NewClient(d.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	f.stop = func() {
		once.Do(func() {
			_ = conn.Close()
			stopServing()
			<-served
			_ = d.Close()
		})
	}
	t.Cleanup(f.stop)
	f.creds, f.admins = pb.NewCredentialServiceClient(conn), pb.NewAdminServiceClient(conn)
	f.admin = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+reloadAdminToken)
	f.svc = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+reloadSvcToken)
}

func (f *reloadFixture) reloadFailures() float64 {
	f.t.Helper()
	return scrapeMetrics(f.t, f.d)["credbroker_config_reload_failures_total"]
}

func (f *reloadFixture) issueTTL(role string) time.Duration {
	f.t.Helper()
	r, err := f.creds.IssueCredential(f.svc, &pb.IssueCredentialRequest{Role: role})
	if err != nil {
		f.t.Fatalf("issue %s: %v", role, err)
	}
	l := r.GetLease()
	return l.GetExpireTime().AsTime().Sub(l.GetIssueTime().AsTime())
}

// TestReloadUnderAnOpenKeepAliveStream: a reload that changes a role's
// default_ttl and an identity's allowed glob applies to the next issue,
// and the KeepAlive stream opened before it still answers. An invalid
// file, and a file that changes a key needing a restart, change nothing,
// each counted in credbroker_config_reload_failures_total and named in
// the answer and in /readyz; a good reload clears /readyz.
func TestReloadUnderAnOpenKeepAliveStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rolesV1 := func(ro string) string {
		return fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 10m, allowed: ["svc-*"]}
  - {name: reports, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 10m, allowed: ["batch-*"]}
`, ro, ro)
	}
	f := newReloadFixture(t, ctx, rolesV1)

	if got := f.issueTTL("read_only"); got != time.Minute {
		t.Fatalf("TTL before the reload = %v, want 1m", got)
	}
	if _, err := f.creds.IssueCredential(f.svc, &pb.IssueCredentialRequest{Role: "reports"}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("issue of reports before the reload: %v, want PermissionDenied", err)
	}
	// The stream, open across the reloads.
	kept, err := f.creds.IssueCredential(f.svc, &pb.IssueCredentialRequest{Role: "read_only"})
	if err != nil {
		t.Fatal(err)
	}
	ka, err := f.creds.KeepAlive(f.svc)
	if err != nil {
		t.Fatal(err)
	}
	keepAlive := func(when string) {
		t.Helper()
		if err := ka.Send(&pb.KeepAliveRequest{LeaseId: kept.GetLease().GetId()}); err != nil {
			t.Fatalf("%s: KeepAlive send: %v", when, err)
		}
		r, err := ka.Recv()
		if err != nil {
			t.Fatalf("%s: KeepAlive recv: %v", when, err)
		}
		if r.GetEvent() != pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED {
			t.Fatalf("%s: KeepAlive event %v, want RENEWED", when, r.GetEvent())
		}
	}
	keepAlive("before the reload")
	failures := f.reloadFailures()

	// An invalid file: nothing changes, counted, in /readyz with its key.
	f.write(fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: soon, max_ttl: 10m, allowed: ["*"]}
`, f.ro))
	_, err = f.admins.ReloadConfig(f.admin, &pb.ReloadConfigRequest{})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "roles[0].default_ttl") {
		t.Fatalf("reload of an invalid file: %v, want InvalidArgument naming roles[0].default_ttl", err)
	}
	if got := f.reloadFailures(); got != failures+1 {
		t.Errorf("credbroker_config_reload_failures_total = %v after an invalid file, want %v", got, failures+1)
	}
	if code, body := httpGet(t, f.d, "/readyz"); code != http.StatusOK || !strings.Contains(body, "roles[0].default_ttl") {
		t.Errorf("/readyz after a failed reload = %d %q, want 200 naming roles[0].default_ttl", code, body)
	}
	if got := f.issueTTL("read_only"); got != time.Minute {
		t.Errorf("TTL after an invalid file = %v, want the old 1m", got)
	}

	// A key that needs a restart: refused by name, nothing changes.
	f.head = strings.Replace(f.head, "listen: 127.0.0.1:0\nmetrics", "listen: 127.0.0.1:7999\nmetrics", 1)
	f.write(fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 2m, max_ttl: 10m, allowed: ["svc-*"]}
`, f.ro))
	_, err = f.admins.ReloadConfig(f.admin, &pb.ReloadConfigRequest{})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "listen: 127.0.0.1:0 -> 127.0.0.1:7999") {
		t.Fatalf("reload changing listen: %v, want FailedPrecondition naming listen", err)
	}
	if got := f.reloadFailures(); got != failures+2 {
		t.Errorf("credbroker_config_reload_failures_total = %v after a refused key, want %v", got, failures+2)
	}
	if got := f.issueTTL("read_only"); got != time.Minute {
		t.Errorf("TTL after a refused reload = %v, want the old 1m", got)
	}
	keepAlive("after the refused reloads")

	// The good reload: default_ttl and the allowed globs change.
	f.head = strings.Replace(f.head, "127.0.0.1:7999", "127.0.0.1:0", 1)
	f.write(fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 3m, max_ttl: 10m, allowed: ["svc-*"]}
  - {name: reports, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 10m, allowed: ["batch-*", "svc-orders"]}
`, f.ro, f.ro))
	res, err := f.admins.ReloadConfig(f.admin, &pb.ReloadConfigRequest{})
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	for _, want := range []string{
		"roles[read_only].default_ttl: 1m0s -> 3m0s",
		"roles[reports].allowed: [batch-*] -> [batch-* svc-orders]",
	} {
		if !slices.Contains(res.GetChanges(), want) {
			t.Errorf("reload changes %q lack %q", res.GetChanges(), want)
		}
	}
	if res.GetConfigFile() != f.path {
		t.Errorf("config_file = %q, want %q", res.GetConfigFile(), f.path)
	}
	if got := f.issueTTL("read_only"); got != 3*time.Minute {
		t.Errorf("TTL after the reload = %v, want the new default 3m", got)
	}
	if got := f.issueTTL("reports"); got != time.Minute {
		t.Errorf("reports TTL after the reload = %v, want 1m", got)
	}
	keepAlive("after the reload")
	if got := f.reloadFailures(); got != failures+2 {
		t.Errorf("credbroker_config_reload_failures_total = %v after a good reload, want %v", got, failures+2)
	}
	if code, body := httpGet(t, f.d, "/readyz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/readyz after a good reload = %d %q, want 200 ok", code, body)
	}
	// A caller that is not an admin may not reload.
	if _, err := f.admins.ReloadConfig(f.svc, &pb.ReloadConfigRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("reload by a non-admin: %v, want PermissionDenied", err)
	}
}

// TestReloadOnSIGHUPRemovesARoleAndKeepsItsLeases: SIGHUP reloads; a
// removed role is refused to new issues while its live lease keeps its
// expiry and still renews.
func TestReloadOnSIGHUPRemovesARoleAndKeepsItsLeases(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f := newReloadFixture(t, ctx, func(ro string) string {
		return fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 10m, allowed: ["svc-*"]}
  - {name: temp, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 10m, allowed: ["svc-*"]}
`, ro, ro)
	})
	old, err := f.creds.IssueCredential(f.svc, &pb.IssueCredentialRequest{Role: "temp"})
	if err != nil {
		t.Fatal(err)
	}
	f.write(fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 10m, allowed: ["svc-*"]}
`, f.ro))
	hup := make(chan os.Signal, 1)
	go f.d.HandleHUP(ctx, hup)
	hup <- syscall.SIGHUP
	deadline := time.Now().Add(30 * time.Second)
	for len(f.d.Broker().Roles()) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("roles after SIGHUP = %+v, want read_only only", f.d.Broker().Roles())
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
	// The caller hears what it hears for any role it may not issue.
	if _, err := f.creds.IssueCredential(f.svc, &pb.IssueCredentialRequest{Role: "temp"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("issue of the removed role: %v, want PermissionDenied", err)
	}
	l, err := f.creds.LookupLease(f.svc, &pb.LookupLeaseRequest{LeaseId: old.GetLease().GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if !l.GetLease().GetExpireTime().AsTime().Equal(old.GetLease().GetExpireTime().AsTime()) || l.GetLease().GetState() != pb.LeaseState_LEASE_STATE_ACTIVE {
		t.Errorf("removed role's lease after reload: %v %v, want unchanged and active", l.GetLease().GetExpireTime().AsTime(), l.GetLease().GetState())
	}
	if _, err := f.creds.RenewLease(f.svc, &pb.RenewLeaseRequest{LeaseId: old.GetLease().GetId()}); err != nil {
		t.Errorf("renew the removed role's lease: %v", err)
	}
}
