package daemon

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/pgtest"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// scrape is one /metrics answer: each sample's value by its series, written
// as Prometheus writes it (name{label="value",...}, labels sorted).
type scrape map[string]float64

var sampleLabel = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func scrapeMetrics(t *testing.T, d *Daemon) scrape {
	t.Helper()
	resp, err := http.Get("http://" + d.MetricsAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	s := scrape{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		s[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return s
}

// labelValues are every label value of every series.
func (s scrape) labelValues() map[string]bool {
	vals := map[string]bool{}
	for series := range s {
		for _, m := range sampleLabel.FindAllStringSubmatch(series, -1) {
			vals[m[2]] = true
		}
	}
	return vals
}

func httpGet(t *testing.T, d *Daemon, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + d.MetricsAddr().String() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

const metricsClient = "metrics-client-7"

// metricsConfig is a configuration with metrics.listen on a free loopback
// port and one target, main, at adminURL; rest holds the roles and more.
func metricsConfig(t *testing.T, tg *pgtest.Target, adminURL, rest string) *config.Config {
	t.Helper()
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return parseConfig(t, fmt.Sprintf(`listen: 127.0.0.1:0
metrics: {listen: 127.0.0.1:0}
store: {path: %q}
targets:
  - {name: main, url: %q, password_file: %q, marker_role: %s, connect_timeout: 5s}
`, filepath.Join(dir, "leases.db"), adminURL, pw, tg.MarkerRole)+rest)
}

// TestMetricsFollowTheLifecycle drives a broker started through Start
// over real gRPC (issue, renew, KeepAlive, revoke, expire, refusals) and
// checks that every pinned metric moved by exactly what happened, that no
// label value is a lease id, a username or the client's identity, and
// that the probes answer.
func TestMetricsFollowTheLifecycle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	const token = "token-metrics-0123456789"
	ro := tg.ProxyRoles["read_only"]
	cfg := metricsConfig(t, tg, tg.AdminURL, fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m, allowed: [%s]}
  - {name: short, target: main, proxy_role: %s, default_ttl: 1s, max_ttl: 1m, allowed: [%s]}
  - {name: other, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m, allowed: [someone-else]}
tokens: [{identity: %s, sha256: %s}]
`, ro, metricsClient, ro, metricsClient, ro, metricsClient, server.TokenHash(token)))

	d, err := Start(ctx, cfg, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	serveCtx, stopServing := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- d.Serve(serveCtx) }()
	defer func() { stopServing(); <-served }()
	<-d.Ready()

	// Watchers run in the order they were registered, after the metrics'
	// own: once this one hears of the expiry, the metrics have counted it.
	expired := make(chan string, 1)
	stop := d.Broker().WatchLifecycle(func(ev broker.AuditEvent) {
		if ev.Action == broker.AuditExpire {
			expired <- ev.LeaseID
		}
	})
	defer stop()

	conn, err := grpc.NewClient(d.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	creds := pb.NewCredentialServiceClient(conn)
	authed := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)

	before := scrapeMetrics(t, d)

	var leaseIDs, usernames []string
	issue := func(role string) *pb.IssueCredentialResponse {
		t.Helper()
		r, err := creds.IssueCredential(authed, &pb.IssueCredentialRequest{Role: role})
		if err != nil {
			t.Fatalf("issue %s: %v", role, err)
		}
		leaseIDs = append(leaseIDs, r.GetLease().GetId())
		usernames = append(usernames, r.GetCredential().GetUsername())
		return r
	}
	kept, revoked, short := issue("read_only"), issue("read_only"), issue("short")
	if _, err := creds.RenewLease(authed, &pb.RenewLeaseRequest{LeaseId: kept.GetLease().GetId(), Increment: durationpb.New(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if _, err := creds.RevokeLease(authed, &pb.RevokeLeaseRequest{LeaseId: revoked.GetLease().GetId()}); err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-expired:
		if id != short.GetLease().GetId() {
			t.Fatalf("expired %s, want %s", id, short.GetLease().GetId())
		}
	case <-ctx.Done():
		t.Fatal("the short lease never expired")
	}

	// Refusals: no token, a role this identity may not issue.
	if _, err := creds.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: "read_only"}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("issue without a token: %v, want Unauthenticated", err)
	}
	if _, err := creds.IssueCredential(authed, &pb.IssueCredentialRequest{Role: "other"}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("issue of a role not allowed: %v, want PermissionDenied", err)
	}

	// A KeepAlive stream, open while scraped; its first request renews.
	streamCtx, endStream := context.WithCancel(authed)
	ka, err := creds.KeepAlive(streamCtx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ka.Send(&pb.KeepAliveRequest{LeaseId: kept.GetLease().GetId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := ka.Recv(); err != nil {
		t.Fatal(err)
	}
	after := scrapeMetrics(t, d)
	endStream()

	const (
		grpcIssue = `grpc_method="IssueCredential",grpc_service="credbroker.v1.CredentialService",grpc_type="unary"`
	)
	deltas := map[string]float64{
		`credbroker_issued_total{role="read_only"}`:                                 2,
		`credbroker_issued_total{role="short"}`:                                     1,
		`credbroker_issued_total{role="other"}`:                                     0,
		`credbroker_renewed_total{role="read_only"}`:                                2, // RenewLease and the stream's renewal
		`credbroker_revoked_total{reason="revoked",role="read_only"}`:               1,
		`credbroker_revoked_total{reason="expired",role="short"}`:                   1,
		`credbroker_revoked_total{reason="expired",role="read_only"}`:               0,
		`credbroker_revoked_total{reason="disconnect",role="read_only"}`:            0,
		`credbroker_revoked_total{reason="unused",role="read_only"}`:                0,
		`credbroker_revoked_total{reason="reconcile",role="_unknown"}`:              0,
		`credbroker_revoked_total{reason="reconcile",role="read_only"}`:             0,
		`credbroker_revoke_failures_total{role="read_only"}`:                        0,
		`credbroker_requests_denied_total{reason="unauthenticated"}`:                1,
		`credbroker_requests_denied_total{reason="permission_denied"}`:              1,
		`credbroker_requests_denied_total{reason="resource_exhausted"}`:             0,
		`credbroker_issue_duration_seconds_count{role="read_only"}`:                 2,
		`credbroker_issue_duration_seconds_count{role="short"}`:                     1,
		`credbroker_expiry_lag_seconds_count`:                                       1,
		`credbroker_config_reload_failures_total`:                                   0,
		`grpc_server_handled_total{grpc_code="OK",` + grpcIssue + `}`:               3,
		`grpc_server_handled_total{grpc_code="Unauthenticated",` + grpcIssue + `}`:  1,
		`grpc_server_handled_total{grpc_code="PermissionDenied",` + grpcIssue + `}`: 1,
	}
	for series, want := range deltas {
		a, ok := after[series]
		if !ok {
			t.Errorf("%s: not exported", series)
			continue
		}
		if got := a - before[series]; got != want {
			t.Errorf("%s moved by %v, want %v", series, got, want)
		}
	}
	gauges := map[string]float64{
		`credbroker_leases{role="read_only",state="active"}`: 1,
		`credbroker_leases{role="short",state="active"}`:     0,
		`credbroker_keepalive_streams`:                       1,
		`credbroker_is_leader`:                               1,
		`credbroker_target_up{target="main"}`:                1,
	}
	for series, want := range gauges {
		if got, ok := after[series]; !ok || got != want {
			t.Errorf("%s = %v (exported: %t), want %v", series, got, ok, want)
		}
	}
	if after["credbroker_store_commit_duration_seconds_count"] <= before["credbroker_store_commit_duration_seconds_count"] {
		t.Error("credbroker_store_commit_duration_seconds did not count the commits")
	}
	if after[`credbroker_expiry_lag_seconds_sum`] < 0 {
		t.Error("negative expiry lag")
	}
	for _, series := range []string{"go_goroutines", "process_open_fds"} {
		if _, ok := after[series]; !ok {
			t.Errorf("%s: not exported (Go and process collectors)", series)
		}
	}
	buildInfo := false
	for series, v := range after {
		if strings.HasPrefix(series, "credbroker_build_info{version=") && v == 1 {
			buildInfo = true
		}
	}
	if !buildInfo {
		t.Error("credbroker_build_info{version} is not 1")
	}

	values := after.labelValues()
	for _, secret := range append(append(leaseIDs, usernames...), metricsClient) {
		if values[secret] {
			t.Errorf("a label value is a lease id, username or identity: %q", secret)
		}
	}

	if code, body := httpGet(t, d, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d %s", code, body)
	}
	if code, body := httpGet(t, d, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz: %d %s", code, body)
	}
}

// TestReadyzWhenTheOnlyTargetIsDown: the broker starts and is alive with
// its one target unreachable, but not ready.
func TestReadyzWhenTheOnlyTargetIsDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	pgURL, err := url.Parse(tg.AdminURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newTCPProxy(t, pgURL.Host) // never started: connections are refused
	pgURL.Host = proxy.addr
	cfg := metricsConfig(t, tg, pgURL.String(), fmt.Sprintf("roles:\n  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m}\n",
		tg.ProxyRoles["read_only"]))
	d, err := Start(ctx, cfg, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if code, body := httpGet(t, d, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d %s", code, body)
	}
	if v := scrapeMetrics(t, d)[`credbroker_target_up{target="main"}`]; v != 0 {
		t.Errorf("credbroker_target_up of the target that is down = %v", v)
	}
	code, body := httpGet(t, d, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "no target is reachable") {
		t.Errorf("/readyz with the only target down: %d %q, want 503 naming the targets", code, body)
	}
}
