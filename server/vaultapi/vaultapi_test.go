package vaultapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/internal/testpki"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// Tokens of the token-mode broker: svc may issue read_only and short,
// admin is an admin (and may issue nothing).
const (
	svcToken   = "vault-svc-token-0123456789abcdef"
	adminToken = "vault-admin-token-0123456789abcdef"
	otherToken = "vault-other-token-0123456789abcdef"
)

// broker is a brokerd started from a configuration with vault_api.listen,
// through daemon.Start as brokerd starts.
type broker struct {
	t      *testing.T
	d      *daemon.Daemon
	tg     *pgtest.Target
	addr   string // http://host:port of the Vault API
	log    *syncbuf.Buffer
	audit  string // the audit log's path
	cancel context.CancelFunc
}

// startBroker starts a broker on a fresh target. rest is appended to the
// configuration (roles are there already, see below); %[1]s in rest is
// the read_only proxy role.
func startBroker(t *testing.T, rest string) *broker {
	t.Helper()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	auditPath := filepath.Join(dir, "audit.log")
	yaml := fmt.Sprintf(`listen: 127.0.0.1:0
vault_api: {listen: 127.0.0.1:0}
store: {path: %q}
targets:
  - {name: main, url: %q, password_file: %q, marker_role: %s, connect_timeout: 5s}
dsn_sslmode: disable
shutdown_timeout: 2s
audit: {path: %q}
`, filepath.Join(dir, "leases.db"), tg.AdminURL, pw, tg.MarkerRole, auditPath) + fmt.Sprintf(rest, tg.ProxyRoles["read_only"])
	f, err := config.Parse([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.Validate()
	if err != nil {
		t.Fatalf("configuration: %v\n%s", err, yaml)
	}
	logs := &syncbuf.Buffer{}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.Start(ctx, cfg, daemon.Options{
		StoreNoSync: true, SkipPrivilegeCheck: true,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		_ = d.Close()
	})
	select {
	case <-d.Ready():
	case err := <-served:
		t.Fatalf("serve: %v", err)
	}
	scheme := "http://"
	if cfg.Security.TLS != nil {
		scheme = "https://"
	}
	return &broker{t: t, d: d, tg: tg, addr: scheme + d.VaultAPIAddr().String(), log: logs, audit: auditPath, cancel: cancel}
}

// tokenConfig has tokens for svc (may issue read_only and short), other
// (may issue read_only) and admin (an admin).
var tokenConfig = fmt.Sprintf(`roles:
  - {name: read_only, target: main, proxy_role: %%[1]s, default_ttl: 1m, max_ttl: 5m, allowed: [svc, other]}
  - {name: short, target: main, proxy_role: %%[1]s, default_ttl: 2s, max_ttl: 6s, allowed: [svc]}
tokens:
  - {identity: svc, sha256: %s}
  - {identity: other, sha256: %s}
  - {identity: admin, sha256: %s}
admins: [admin]
`, server.TokenHash(svcToken), server.TokenHash(otherToken), server.TokenHash(adminToken))

// localConfig is local mode: no tokens, every caller is the admin "local".
const localConfig = `roles:
  - {name: read_only, target: main, proxy_role: %[1]s, default_ttl: 1m, max_ttl: 5m}
`

// client is the real Vault Go client on the broker, with token (none if "").
func (b *broker) client(token string) *vault.Client {
	b.t.Helper()
	cfg := vault.DefaultConfig()
	cfg.Address = b.addr
	cfg.MaxRetries = 0 // a retried request would hide the status asked for
	cfg.Timeout = 30 * time.Second
	c, err := vault.NewClient(cfg)
	if err != nil {
		b.t.Fatal(err)
	}
	c.ClearToken()
	if token != "" {
		c.SetToken(token)
	}
	return c
}

// responseCode is the HTTP status of a Vault client's error, 0 if none.
func responseCode(err error) int {
	var re *vault.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode
	}
	return 0
}

// wantCode fails unless err is a Vault response error with code.
func wantCode(t *testing.T, what string, err error, code int) {
	t.Helper()
	if got := responseCode(err); got != code {
		t.Fatalf("%s: %v (status %d), want status %d", what, err, got, code)
	}
}

// login connects as an issued user and runs a query.
func login(ctx context.Context, t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("log in with the issued credential: %v", err)
	}
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		conn.Close(ctx)
		t.Fatalf("query as the issued user: %v", err)
	}
	return conn
}

// roleExists asks PostgreSQL, as superuser, whether the user exists.
func (b *broker) roleExists(ctx context.Context, name string) bool {
	b.t.Helper()
	conn, err := pgx.Connect(ctx, b.tg.SuperURL)
	if err != nil {
		b.t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_roles WHERE rolname = $1", name).Scan(&n); err != nil {
		b.t.Fatal(err)
	}
	return n == 1
}

// issue reads <mount>/creds/<role> with c and checks the secret's shape.
func issue(t *testing.T, c *vault.Client, role string) *vault.Secret {
	t.Helper()
	s, err := c.Logical().Read("database/creds/" + role)
	if err != nil {
		t.Fatalf("read database/creds/%s: %v", role, err)
	}
	if s == nil || s.Data == nil {
		t.Fatalf("read database/creds/%s: no secret", role)
	}
	if !strings.HasPrefix(s.LeaseID, "database/creds/"+role+"/") || len(s.LeaseID) <= len("database/creds/"+role+"/") {
		t.Fatalf("lease_id %q, want database/creds/%s/<id>", s.LeaseID, role)
	}
	if !s.Renewable || s.LeaseDuration <= 0 || s.RequestID == "" {
		t.Fatalf("secret %+v: want renewable, a lease_duration and a request_id", s)
	}
	for _, k := range []string{"username", "password", "dsn"} {
		if v, _ := s.Data[k].(string); v == "" {
			t.Fatalf("secret data has no %s: %v", k, keys(s.Data))
		}
	}
	return s
}

func keys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestVaultClientLifecycle drives the real Vault Go client through a
// credential's life: read, log in, look up, renew (capped at max_ttl),
// revoke (an open session dies, the user is gone), and an admin's
// revoke-prefix and LIST, with the token-mode policy applied as over gRPC.
func TestVaultClientLifecycle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := startBroker(t, tokenConfig)
	svc, admin, other := b.client(svcToken), b.client(adminToken), b.client(otherToken)

	s := issue(t, svc, "read_only")
	if s.LeaseDuration != 60 {
		t.Errorf("lease_duration %d, want the role's default TTL, 60", s.LeaseDuration)
	}
	if s.MountType != "database" {
		t.Errorf("mount_type %q, want database", s.MountType)
	}
	username, password, dsn := s.Data["username"].(string), s.Data["password"].(string), s.Data["dsn"].(string)
	conn := login(ctx, t, dsn)
	defer conn.Close(context.Background())
	// The two fields every Vault client reads are enough on their own.
	login(ctx, t, b.tg.URL(username, password)).Close(ctx)

	// Lookup.
	l, err := svc.Sys().Lookup(s.LeaseID)
	if err != nil {
		t.Fatalf("lookup: %v", err)
	}
	if l.Data["id"] != s.LeaseID {
		t.Errorf("lookup id %v, want %s", l.Data["id"], s.LeaseID)
	}
	if ttl, err := l.Data["ttl"].(interface{ Int64() (int64, error) }).Int64(); err != nil || ttl <= 0 || ttl > 60 {
		t.Errorf("lookup ttl %v, want 1..60", l.Data["ttl"])
	}
	// Another client's lease is not there for it (as over gRPC: NotFound).
	_, err = other.Sys().Lookup(s.LeaseID)
	wantCode(t, "lookup of another identity's lease", err, http.StatusBadRequest)

	// Renew, then renew past max_ttl: capped, with Vault's warning.
	r, err := svc.Sys().Renew(s.LeaseID, 120)
	if err != nil {
		t.Fatalf("renew: %v", err)
	}
	if r.LeaseID != s.LeaseID || r.LeaseDuration < 119 || r.LeaseDuration > 120 || !r.Renewable {
		t.Errorf("renew: %+v, want lease %s for 120s, renewable", r, s.LeaseID)
	}
	r, err = svc.Sys().Renew(s.LeaseID, 3600)
	if err != nil {
		t.Fatalf("renew past max_ttl: %v", err)
	}
	if r.LeaseDuration > 300 || r.LeaseDuration < 290 || len(r.Warnings) == 0 {
		t.Errorf("renew past max_ttl: lease_duration %d, warnings %q; want capped at 300s with a warning", r.LeaseDuration, r.Warnings)
	}
	_, err = other.Sys().Renew(s.LeaseID, 10)
	wantCode(t, "renew of another identity's lease", err, http.StatusBadRequest)
	// Revoking another identity's lease answers as for an unknown lease
	// (204, as Vault), and revokes nothing.
	if err := other.Sys().Revoke(s.LeaseID); err != nil {
		t.Errorf("revoke of another identity's lease: %v, want 204", err)
	}
	if !b.roleExists(ctx, username) {
		t.Fatalf("another identity's revoke dropped user %s", username)
	}
	// The role segment of a lease id must be the lease's, for lookup.
	_, err = svc.Sys().Lookup(strings.Replace(s.LeaseID, "/read_only/", "/short/", 1))
	wantCode(t, "lookup under another role", err, http.StatusBadRequest)

	// Revoke: returns once the user is gone; the open session is ended.
	if err := svc.Sys().Revoke(s.LeaseID); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	if b.roleExists(ctx, username) {
		t.Errorf("user %s still exists after revoke returned", username)
	}
	if err := conn.Ping(ctx); err == nil {
		t.Error("the session opened before revoke still answers")
	}
	_, err = svc.Sys().Lookup(s.LeaseID)
	wantCode(t, "lookup of a revoked lease", err, http.StatusBadRequest)
	_, err = svc.Sys().Renew(s.LeaseID, 10)
	wantCode(t, "renew of a revoked lease", err, http.StatusBadRequest)
	if err := svc.Sys().Revoke(s.LeaseID); err != nil {
		t.Errorf("revoking again: %v, want success (idempotent, as Vault)", err)
	}

	// Admin: LIST and revoke-prefix by role.
	s1, s2 := issue(t, svc, "read_only"), issue(t, svc, "read_only")
	_, err = svc.Logical().List("sys/leases/lookup/database/creds/read_only/")
	wantCode(t, "LIST by a non-admin", err, http.StatusForbidden)
	list, err := admin.Logical().List("sys/leases/lookup/database/creds/read_only/")
	if err != nil {
		t.Fatalf("LIST leases: %v", err)
	}
	got := fmt.Sprint(list.Data["keys"])
	for _, id := range []string{s1.LeaseID, s2.LeaseID} {
		if !strings.Contains(got, id[strings.LastIndexByte(id, '/')+1:]) {
			t.Errorf("LIST keys %s lack %s", got, id)
		}
	}
	wantCode(t, "revoke-prefix by a non-admin", svc.Sys().RevokePrefix("database/creds/read_only"), http.StatusForbidden)
	wantCode(t, "revoke-prefix wider than a role", admin.Sys().RevokePrefix("database/creds"), http.StatusBadRequest)
	if err := admin.Sys().RevokePrefix("database/creds/read_only"); err != nil {
		t.Fatalf("revoke-prefix: %v", err)
	}
	for _, s := range []*vault.Secret{s1, s2} {
		if u := s.Data["username"].(string); b.roleExists(ctx, u) {
			t.Errorf("user %s still exists after revoke-prefix returned", u)
		}
	}
	// Vault answers a LIST of nothing with 404, which the Go client
	// turns into no secret and no error.
	if list, err := admin.Logical().List("sys/leases/lookup/database/creds/read_only/"); list != nil || err != nil {
		t.Errorf("LIST after revoke-prefix: %v, %v; want nothing", list, err)
	}
	if code, body := b.do(t, "LIST", "/v1/sys/leases/lookup/database/creds/read_only/", adminToken, ""); code != http.StatusNotFound {
		t.Errorf("LIST after revoke-prefix: %d %s, want 404", code, body)
	}

	// The same audit trail as gRPC: who, which call, which lease; no
	// password, anywhere.
	raw, err := os.ReadFile(b.audit)
	if err != nil {
		t.Fatal(err)
	}
	trail := string(raw)
	for _, want := range []string{`"method":"/credbroker.v1.CredentialService/IssueCredential"`, `"identity":"svc"`,
		`"method":"/credbroker.v1.AdminService/RevokeLeases"`, `"identity":"admin"`, username} {
		if !strings.Contains(trail, want) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	for _, secret := range []string{password, s1.Data["password"].(string), svcToken, adminToken} {
		if strings.Contains(trail, secret) || strings.Contains(b.log.String(), secret) {
			t.Errorf("a password or token is in the audit log or brokerd's log")
		}
	}
	if !strings.Contains(b.log.String(), "via=vault_api") {
		t.Error("brokerd's log lines do not say the calls came through the Vault API")
	}
}

// TestLifetimeWatcherKeepsALeaseToItsMaxTTL runs the Vault client's
// LifetimeWatcher on a lease of the role short (2s TTL, 6s max): it keeps
// the lease alive past its first TTL, and reports done once renewals are
// capped at the max TTL.
func TestLifetimeWatcherKeepsALeaseToItsMaxTTL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := startBroker(t, tokenConfig)
	c := b.client(svcToken)
	issued := time.Now()
	s := issue(t, c, "short")
	if s.LeaseDuration != 2 {
		t.Fatalf("lease_duration %d, want 2", s.LeaseDuration)
	}
	firstExpiry := issued.Add(2 * time.Second)
	maxExpiry := time.Now().Add(6 * time.Second)

	w, err := c.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: s, Increment: 2})
	if err != nil {
		t.Fatal(err)
	}
	go w.Start()
	defer w.Stop()

	deadline := time.NewTimer(20 * time.Second)
	defer deadline.Stop()
	renewals, pastFirstTTL := 0, false
	for !pastFirstTTL {
		select {
		case out := <-w.RenewCh():
			renewals++
			if out.Secret.LeaseID != s.LeaseID {
				t.Fatalf("renewed %s, want %s", out.Secret.LeaseID, s.LeaseID)
			}
			pastFirstTTL = out.RenewedAt.After(firstExpiry)
		case err := <-w.DoneCh():
			t.Fatalf("watcher done after %d renewals, before the first TTL had passed: %v", renewals, err)
		case <-deadline.C:
			t.Fatalf("no renewal past the first TTL within 20s (%d renewals)", renewals)
		}
	}
	// Past the first TTL the lease is live and the user logs in.
	l, err := c.Sys().Lookup(s.LeaseID)
	if err != nil {
		t.Fatalf("lookup past the first TTL: %v", err)
	}
	if l.Data["state"] != "active" {
		t.Fatalf("lease past its first TTL is %v, want active", l.Data["state"])
	}
	login(ctx, t, s.Data["dsn"].(string)).Close(ctx)

	for done := false; !done; {
		select {
		case <-w.RenewCh():
			renewals++
		case err := <-w.DoneCh():
			if err != nil {
				t.Fatalf("watcher: %v", err)
			}
			done = true
		case <-deadline.C:
			t.Fatalf("watcher not done within 20s (%d renewals); the max TTL was at %s", renewals, maxExpiry.Format(time.StampMilli))
		}
	}
	t.Logf("watcher done %s after the issue, %d renewals", time.Since(issued).Round(time.Millisecond), renewals)
	// Done means "get a new credential": it comes before the lease ends,
	// and not long before (renewals were capped, not refused).
	if now := time.Now(); now.After(maxExpiry) || now.Before(maxExpiry.Add(-3*time.Second)) {
		t.Errorf("watcher done at %s, want shortly before the max TTL at %s", now.Format(time.StampMilli), maxExpiry.Format(time.StampMilli))
	}
	if renewals < 2 {
		t.Errorf("%d renewals, want at least 2 over a 6s max TTL with a 2s TTL", renewals)
	}
}

// TestVaultClientErrors checks the status codes Vault gives for a wrong
// or missing token, an unknown role, an unknown lease and malformed
// input, with Vault's error body.
func TestVaultClientErrors(t *testing.T) {
	b := startBroker(t, tokenConfig)
	svc := b.client(svcToken)

	_, err := b.client("not-a-token").Logical().Read("database/creds/read_only")
	wantCode(t, "read with a wrong token", err, http.StatusForbidden)
	if !strings.Contains(err.Error(), "permission denied") || strings.Contains(err.Error(), "not-a-token") {
		t.Errorf("wrong token: %v, want Vault's \"permission denied\" without the token", err)
	}
	_, err = b.client("").Logical().Read("database/creds/read_only")
	wantCode(t, "read without a token", err, http.StatusForbidden)
	_, err = svc.Logical().Read("database/creds/nope")
	wantCode(t, "read of a role the identity may not issue (or that does not exist)", err, http.StatusForbidden)

	unknown := "database/creds/read_only/" + strings.Repeat("a", 32) // well-formed, never issued
	_, err = svc.Sys().Renew(unknown, 10)
	wantCode(t, "renew of an unknown lease", err, http.StatusBadRequest)
	_, err = svc.Sys().Lookup(unknown)
	wantCode(t, "lookup of an unknown lease", err, http.StatusBadRequest)
	if err := svc.Sys().Revoke(unknown); err != nil {
		t.Errorf("revoke of an unknown lease: %v, want 204 as Vault", err)
	}
	_, err = svc.Sys().Renew("secret/data/x", 10)
	wantCode(t, "renew of a lease id of another mount", err, http.StatusBadRequest)

	for _, tc := range []struct {
		method, path, body string
		want               int
	}{
		{"PUT", "/v1/sys/leases/renew", `{"lease_id":`, http.StatusBadRequest},
		{"PUT", "/v1/sys/leases/renew", `["database/creds/read_only/x"]`, http.StatusBadRequest},
		{"PUT", "/v1/sys/leases/renew", `{"lease_id":"` + unknown + `","increment":-5}`, http.StatusBadRequest},
		{"PUT", "/v1/sys/leases/renew", `{"lease_id":"` + unknown + `","increment":"soon"}`, http.StatusBadRequest},
		{"PUT", "/v1/sys/leases/renew", `{}`, http.StatusBadRequest},
		{"PUT", "/v1/sys/leases/lookup", `{"lease_id":7}`, http.StatusBadRequest},
		{"POST", "/v1/database/creds/read_only", `{"ttl":`, http.StatusBadRequest},
		{"PUT", "/v1/sys/leases/renew", `{"lease_id":"` + strings.Repeat("x", MaxBody) + `"}`, http.StatusRequestEntityTooLarge},
		{"DELETE", "/v1/database/creds/read_only", ``, http.StatusMethodNotAllowed},
		{"PUT", "/v1/database/roles/read_only", `{}`, http.StatusMethodNotAllowed},
		{"GET", "/v1/secret/data/app", ``, http.StatusNotFound},
		{"GET", "/v2/sys/health", ``, http.StatusNotFound},
		{"GET", "/v1/database/roles/nope", ``, http.StatusForbidden}, // roles are an admin's view
		{"HEAD", "/v1/database/creds/read_only", ``, http.StatusMethodNotAllowed},
	} {
		code, body := b.do(t, tc.method, tc.path, svcToken, tc.body)
		if code != tc.want {
			t.Errorf("%s %s %.40q: %d %s, want %d", tc.method, tc.path, tc.body, code, body, tc.want)
		}
		if tc.method != "HEAD" && !strings.HasPrefix(body, `{"errors":[`) {
			t.Errorf("%s %s: body %s, want Vault's {\"errors\":[...]}", tc.method, tc.path, body)
		}
	}
	if n := strings.Count(b.log.String(), `msg="vault_api request"`); n < 10 {
		t.Errorf("%d requests refused before any call were logged, want every one", n)
	}
	if strings.Contains(b.log.String(), svcToken) {
		t.Error("a token is in brokerd's log")
	}
	code, body := b.do(t, "GET", "/v1/database/roles/nope", adminToken, "")
	if code != http.StatusNotFound || body != `{"errors":[]}`+"\n" {
		t.Errorf("admin reads an unknown role: %d %s, want 404 {\"errors\":[]}", code, body)
	}
}

// MaxBody is one byte more than the handler reads.
const MaxBody = 64<<10 + 1

// TestQuotaAnswers429 checks that the gRPC layer's quotas apply: past
// max_active_per_identity, an issue is 429, as Vault's rate-limit quotas.
func TestQuotaAnswers429(t *testing.T) {
	b := startBroker(t, tokenConfig+"quotas: {max_active_per_identity: 1}\n")
	svc := b.client(svcToken)
	issue(t, svc, "read_only")
	_, err := svc.Logical().Read("database/creds/read_only")
	wantCode(t, "an issue past the quota", err, http.StatusTooManyRequests)
}

// do sends one plain HTTP request and returns the status and body.
func (b *broker) do(t *testing.T, method, path, token, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, b.addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(raw)
}

// decode parses a JSON body that must parse.
func decode(t *testing.T, what, body string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(body), &m); err != nil {
		t.Fatalf("%s: body %q: %v", what, body, err)
	}
	return m
}

// TestPlainHTTPRequestShapes covers with plain HTTP what the Go client
// does not send: the older sys/renew/<id> and sys/revoke/<id> paths, the
// lease id in the URL of sys/leases/renew/<id>, LIST as a method and as
// GET ?list=true, POST to creds, the roles view, the probes and the
// token endpoints, in local mode (any token, or none, is the admin
// "local", as over gRPC).
func TestPlainHTTPRequestShapes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := startBroker(t, localConfig)
	const anyToken = "whatever-local-mode-accepts"

	code, body := b.do(t, "POST", "/v1/database/creds/read_only", anyToken, "")
	if code != http.StatusOK {
		t.Fatalf("POST creds: %d %s", code, body)
	}
	s := decode(t, "POST creds", body)
	leaseID := s["lease_id"].(string)
	data := s["data"].(map[string]any)
	username := data["username"].(string)
	login(ctx, t, data["dsn"].(string)).Close(ctx)
	code, body = b.do(t, "GET", "/v1/database/creds/read_only", "", "")
	if code != http.StatusOK {
		t.Fatalf("GET creds without a token in local mode: %d %s", code, body)
	}
	second := decode(t, "GET creds", body)["lease_id"].(string)
	// An unknown role, where no allow-list hides it: Vault's database
	// engine's 400 "unknown role".
	code, body = b.do(t, "GET", "/v1/database/creds/nope", anyToken, "")
	if code != http.StatusBadRequest || !strings.Contains(body, "unknown role: nope") {
		t.Errorf("GET creds of an unknown role: %d %s, want 400 unknown role", code, body)
	}

	for _, tc := range []struct {
		method, path, body string
		want               float64
	}{
		// Each longer than the last: a renewal never shortens a lease.
		{"PUT", "/v1/sys/renew/" + leaseID, `{"increment": 70}`, 70},
		{"PUT", "/v1/sys/renew", `{"lease_id": "` + leaseID + `", "increment": "80s"}`, 80},
		{"POST", "/v1/sys/leases/renew/" + leaseID, `{"increment": "90"}`, 90},
		{"PUT", "/v1/sys/leases/renew", `{"lease_id": "` + leaseID + `", "increment": 100}`, 100},
	} {
		code, body := b.do(t, tc.method, tc.path, anyToken, tc.body)
		if code != http.StatusOK {
			t.Fatalf("%s %s: %d %s", tc.method, tc.path, code, body)
		}
		r := decode(t, tc.path, body)
		if r["lease_id"] != leaseID || r["lease_duration"].(float64) < tc.want-1 || r["lease_duration"].(float64) > tc.want {
			t.Errorf("%s %s %s: %s, want lease %s for %vs", tc.method, tc.path, tc.body, body, leaseID, tc.want)
		}
	}

	// LIST as a method and as ?list=true, at every level of the prefix.
	id := leaseID[strings.LastIndexByte(leaseID, '/')+1:]
	for _, tc := range []struct{ method, path, want string }{
		{"LIST", "/v1/sys/leases/lookup/database/creds/read_only/", id},
		{"GET", "/v1/sys/leases/lookup/database/creds/read_only/?list=true", id},
		{"LIST", "/v1/sys/leases/lookup/database/creds/", "read_only/"},
		{"LIST", "/v1/sys/leases/lookup/database/", "creds/"},
		{"LIST", "/v1/sys/leases/lookup/", "database/"},
		{"LIST", "/v1/database/roles", "read_only"},
		{"GET", "/v1/database/roles/?list=true", "read_only"},
	} {
		code, body := b.do(t, tc.method, tc.path, anyToken, "")
		if code != http.StatusOK {
			t.Fatalf("%s %s: %d %s", tc.method, tc.path, code, body)
		}
		keys := fmt.Sprint(decode(t, tc.path, body)["data"].(map[string]any)["keys"])
		if !strings.Contains(keys, tc.want) {
			t.Errorf("%s %s: keys %s, want %s among them", tc.method, tc.path, keys, tc.want)
		}
	}
	code, body = b.do(t, "LIST", "/v1/sys/leases/lookup/database/creds/nope/", anyToken, "")
	if code != http.StatusNotFound {
		t.Errorf("LIST of a role without leases: %d %s, want 404", code, body)
	}

	code, body = b.do(t, "GET", "/v1/database/roles/read_only", anyToken, "")
	if code != http.StatusOK {
		t.Fatalf("read role: %d %s", code, body)
	}
	role := decode(t, "read role", body)["data"].(map[string]any)
	if role["default_ttl"] != 60.0 || role["max_ttl"] != 300.0 || role["db_name"] != "main" || role["proxy_role"] != b.tg.ProxyRoles["read_only"] {
		t.Errorf("read role: %s", body)
	}

	// The older revoke path, with the lease id in the URL; then the new
	// one with it in the body. Both return once the user is gone.
	code, body = b.do(t, "PUT", "/v1/sys/revoke/"+leaseID, anyToken, "")
	if code != http.StatusNoContent || body != "" {
		t.Fatalf("PUT sys/revoke/<id>: %d %q, want 204 and no body", code, body)
	}
	if b.roleExists(ctx, username) {
		t.Errorf("user %s exists after sys/revoke/<id> returned", username)
	}
	code, body = b.do(t, "PUT", "/v1/sys/leases/revoke", anyToken, `{"lease_id":"`+second+`","sync":false}`)
	if code != http.StatusNoContent {
		t.Fatalf("PUT sys/leases/revoke: %d %s", code, body)
	}
	code, body = b.do(t, "PUT", "/v1/sys/leases/revoke-prefix/database/creds/read_only/", anyToken, "")
	if code != http.StatusNoContent {
		t.Fatalf("PUT sys/leases/revoke-prefix with a trailing slash: %d %s", code, body)
	}
	code, body = b.do(t, "PUT", "/v1/sys/revoke-prefix/database", anyToken, "")
	if code != http.StatusBadRequest {
		t.Errorf("revoke-prefix of the whole mount: %d %s, want 400 (never everything)", code, body)
	}

	// Probes: unauthenticated, never sealed.
	code, body = b.do(t, "GET", "/v1/sys/health", "", "")
	if h := decode(t, "health", body); code != http.StatusOK || h["initialized"] != true || h["sealed"] != false || h["standby"] != false {
		t.Errorf("sys/health: %d %s", code, body)
	}
	if code, _ = b.do(t, "HEAD", "/v1/sys/health", "", ""); code != http.StatusOK {
		t.Errorf("HEAD sys/health: %d", code)
	}
	code, body = b.do(t, "GET", "/v1/sys/seal-status", "", "")
	if h := decode(t, "seal-status", body); code != http.StatusOK || h["sealed"] != false {
		t.Errorf("sys/seal-status: %d %s", code, body)
	}
	mounts, err := b.client(anyToken).Sys().ListMounts()
	if err != nil {
		t.Fatalf("sys/mounts: %v", err)
	}
	if m := mounts["database/"]; m == nil || m.Type != "database" {
		t.Errorf("sys/mounts: %v, want database/ of type database", mounts)
	}

	health, err := b.client("").Sys().Health()
	if err != nil || !health.Initialized || health.Sealed || health.Standby {
		t.Errorf("Sys().Health(): %+v, %v", health, err)
	}
	// Vault Agent's and consul-template's KV v2 preflight before a read.
	code, body = b.do(t, "GET", "/v1/sys/internal/ui/mounts/database/creds/read_only", anyToken, "")
	if pf := decode(t, "preflight", body); code != http.StatusOK || pf["data"].(map[string]any)["type"] != "database" {
		t.Errorf("preflight: %d %s", code, body)
	}
	if code, _ = b.do(t, "GET", "/v1/sys/internal/ui/mounts/secret/app", anyToken, ""); code != http.StatusNotFound {
		t.Errorf("preflight of another mount: %d, want 404", code)
	}

	// Token endpoints.
	self, err := b.client(anyToken).Auth().Token().LookupSelf()
	if err != nil {
		t.Fatalf("lookup-self: %v", err)
	}
	if self.Data["display_name"] != server.LocalIdentityName {
		t.Errorf("lookup-self: %v, want display_name local", self.Data)
	}
	renewed, err := b.client(anyToken).Auth().Token().RenewSelf(0)
	if err != nil {
		t.Fatalf("renew-self: %v", err)
	}
	if renewed.Auth == nil || renewed.Auth.ClientToken != anyToken {
		t.Errorf("renew-self: %+v, want an auth block with the token", renewed)
	}
}

// TestTokenHeaders checks both ways a Vault client sends its token, and
// that the token decides who the caller is, as over gRPC.
func TestTokenHeaders(t *testing.T) {
	b := startBroker(t, tokenConfig)
	for _, tc := range []struct {
		name   string
		header http.Header
		want   int
		who    string
	}{
		{"X-Vault-Token", http.Header{"X-Vault-Token": {svcToken}}, http.StatusOK, "svc"},
		{"Authorization: Bearer", http.Header{"Authorization": {"Bearer " + adminToken}}, http.StatusOK, "admin"},
		{"X-Vault-Token wins", http.Header{"X-Vault-Token": {svcToken}, "Authorization": {"Bearer " + adminToken}}, http.StatusOK, "svc"},
		{"wrong bearer", http.Header{"Authorization": {"Bearer nope"}}, http.StatusForbidden, ""},
		{"none", http.Header{}, http.StatusForbidden, ""},
	} {
		req, err := http.NewRequest("GET", b.addr+"/v1/auth/token/lookup-self", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header = tc.header
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %d %s, want %d", tc.name, resp.StatusCode, raw, tc.want)
			continue
		}
		if tc.want != http.StatusOK {
			if !strings.Contains(string(raw), `"permission denied"`) {
				t.Errorf("%s: %s, want Vault's permission denied", tc.name, raw)
			}
			continue
		}
		if got := decode(t, tc.name, string(raw))["data"].(map[string]any)["display_name"]; got != tc.who {
			t.Errorf("%s: identity %v, want %s", tc.name, got, tc.who)
		}
	}
}

// TestMutualTLSIdentity: with tls and a client CA, the Vault API serves
// HTTPS with the gRPC certificate, a verified client certificate names
// the caller as over gRPC, a certificate and a token together are
// refused, and the calls are counted under their gRPC methods.
func TestMutualTLSIdentity(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.NewCA(t, "vault-api-ca")
	caFile := ca.WriteCA(t, dir, "ca.crt")
	certFile, keyFile := ca.WriteLeaf(t, dir, "server", testpki.Leaf{CN: "brokerd", Server: true})
	clientCert, clientKey := ca.WriteLeaf(t, dir, "payments", testpki.Leaf{URI: "spiffe://test/payments"})
	b := startBroker(t, fmt.Sprintf(`tls: {cert_file: %q, key_file: %q, client_ca_file: %q}
metrics: {listen: 127.0.0.1:0}
roles:
  - {name: read_only, target: main, proxy_role: %%[1]s, default_ttl: 1m, max_ttl: 5m, allowed: ["spiffe://test/*", svc]}
tokens: [{identity: svc, sha256: %s}]
`, certFile, keyFile, caFile, server.TokenHash(svcToken)))

	tlsClient := func(cert bool) *vault.Client {
		cfg := vault.DefaultConfig()
		cfg.Address = b.addr
		cfg.MaxRetries = 0
		tc := &vault.TLSConfig{CACert: caFile}
		if cert {
			tc.ClientCert, tc.ClientKey = clientCert, clientKey
		}
		if err := cfg.ConfigureTLS(tc); err != nil {
			t.Fatal(err)
		}
		c, err := vault.NewClient(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.ClearToken()
		return c
	}
	withCert := tlsClient(true)
	self, err := withCert.Auth().Token().LookupSelf()
	if err != nil {
		t.Fatalf("lookup-self with a client certificate: %v", err)
	}
	if self.Data["display_name"] != "spiffe://test/payments" {
		t.Errorf("identity %v, want the certificate's URI SAN", self.Data["display_name"])
	}
	s := issue(t, withCert, "read_only")
	l, err := withCert.Sys().Lookup(s.LeaseID)
	if err != nil {
		t.Fatalf("lookup of its own lease: %v", err)
	}
	if l.Data["id"] != s.LeaseID {
		t.Errorf("lookup: %v", l.Data)
	}
	// The token's identity does not own the certificate's lease.
	byToken := tlsClient(false)
	byToken.SetToken(svcToken)
	_, err = byToken.Sys().Lookup(s.LeaseID)
	wantCode(t, "lookup of the certificate identity's lease by a token", err, http.StatusBadRequest)
	issue(t, byToken, "read_only")
	both := tlsClient(true)
	both.SetToken(svcToken)
	_, err = both.Logical().Read("database/creds/read_only")
	wantCode(t, "a certificate and a token together", err, http.StatusForbidden)

	// Plaintext to the TLS port gets no credential.
	if resp, err := http.Get("http://" + b.d.VaultAPIAddr().String() + "/v1/database/creds/read_only"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plaintext request answered 200")
		}
	}

	// Metrics: the issues counted under IssueCredential, refusals as denials.
	hc := withCert.CloneConfig().HttpClient
	resp, err := hc.Get("https://" + b.d.MetricsAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`grpc_server_handled_total{grpc_code="OK",grpc_method="IssueCredential",grpc_service="credbroker.v1.CredentialService",grpc_type="unary"} 2`,
		`credbroker_issued_total{role="read_only"} 2`,
		`credbroker_requests_denied_total{reason="unauthenticated"} 1`,
	} {
		if !strings.Contains(string(raw), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// TestLeaseIDUnderAnotherRole checks that renew and revoke, like lookup,
// take a lease id only under the lease's own role: under another role
// (one the caller may use, or one that does not exist) it is answered
// exactly as an unknown lease, and neither renews nor revokes the lease;
// nor does an admin's revoke-prefix of that id.
func TestLeaseIDUnderAnotherRole(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := startBroker(t, tokenConfig)
	svc := b.client(svcToken)
	s := issue(t, svc, "read_only")
	username := s.Data["username"].(string)
	id := strings.TrimPrefix(s.LeaseID, "database/creds/read_only/")
	unknownID := strings.Repeat("a", 32) // well-formed, never issued

	expireTime := func() string {
		t.Helper()
		l, err := svc.Sys().Lookup(s.LeaseID)
		if err != nil {
			t.Fatalf("lookup under the lease's own role: %v", err)
		}
		return fmt.Sprint(l.Data["expire_time"])
	}
	before := expireTime()

	for _, role := range []string{"short", "nope"} {
		wrong := "database/creds/" + role + "/" + id
		// What an unknown lease gets, with its id where the unknown one was.
		code, want := b.do(t, "PUT", "/v1/sys/leases/renew", svcToken, `{"lease_id":"database/creds/`+role+`/`+unknownID+`","increment":3000}`)
		want = strings.ReplaceAll(want, unknownID, id)
		if code != http.StatusBadRequest {
			t.Fatalf("renew of an unknown lease: %d %s, want 400", code, want)
		}
		for _, path := range []string{"/v1/sys/leases/renew", "/v1/sys/leases/renew/" + wrong, "/v1/sys/renew/" + wrong} {
			code, body := b.do(t, "PUT", path, svcToken, `{"lease_id":"`+wrong+`","increment":3000}`)
			if code != http.StatusBadRequest || body != want {
				t.Errorf("PUT %s of %s: %d %s, want 400 %s (as an unknown lease)", path, wrong, code, body, want)
			}
		}
		code, unknownRevoke := b.do(t, "PUT", "/v1/sys/leases/revoke", svcToken, `{"lease_id":"database/creds/`+role+`/`+unknownID+`"}`)
		if code != http.StatusNoContent {
			t.Fatalf("revoke of an unknown lease: %d %s, want 204", code, unknownRevoke)
		}
		for _, path := range []string{"/v1/sys/leases/revoke", "/v1/sys/leases/revoke/" + wrong, "/v1/sys/revoke/" + wrong} {
			code, body := b.do(t, "PUT", path, svcToken, `{"lease_id":"`+wrong+`"}`)
			if code != http.StatusNoContent || body != unknownRevoke {
				t.Errorf("PUT %s of %s: %d %q, want 204 %q (as an unknown lease)", path, wrong, code, body, unknownRevoke)
			}
		}
		// An admin's revoke-prefix of the whole id under another role is a
		// prefix with no lease under it.
		if code, body := b.do(t, "PUT", "/v1/sys/leases/revoke-prefix/"+wrong, adminToken, ""); code != http.StatusNoContent {
			t.Errorf("revoke-prefix %s: %d %s, want 204", wrong, code, body)
		}
	}
	// Nothing changed: the lease is active with its old expiry, its user
	// still exists.
	if after := expireTime(); after != before {
		t.Errorf("expire_time %s after renewals under other roles, was %s: a renewal went through", after, before)
	}
	if !b.roleExists(ctx, username) {
		t.Fatalf("a revoke under another role dropped user %s", username)
	}
	// Under its own role, the same id still renews and revokes.
	if _, err := svc.Sys().Renew(s.LeaseID, 120); err != nil {
		t.Errorf("renew under the lease's own role: %v", err)
	}
	if err := svc.Sys().Revoke(s.LeaseID); err != nil {
		t.Fatalf("revoke under the lease's own role: %v", err)
	}
	if b.roleExists(ctx, username) {
		t.Errorf("user %s still exists after revoke under the lease's own role", username)
	}
}
