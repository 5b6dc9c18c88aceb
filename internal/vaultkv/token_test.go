package vaultkv_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/fakeclock"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/internal/vaultkv"
	"github.com/credbroker/credbroker/internal/vaultkv/kvtest"
)

// tokenHarness is a client and the in-process Vault on one fake clock.
type tokenHarness struct {
	t     *testing.T
	clock *fakeclock.Clock
	vault *kvtest.Server
	logs  *syncbuf.Buffer
	cfg   vaultkv.Config
}

func newTokenHarness(t *testing.T, opts kvtest.Options) *tokenHarness {
	t.Helper()
	h := &tokenHarness{t: t, clock: fakeclock.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), logs: &syncbuf.Buffer{}}
	opts.Clock = h.clock
	h.vault = kvtest.NewServer(t, opts)
	h.vault.Put("x", map[string]string{"password": "pw"})
	h.cfg = vaultkv.Config{
		Address: h.vault.URL, Mount: h.vault.Mount, Path: "x", Auth: vaultkv.AuthAppRole,
		RoleID: h.vault.RoleID, SecretID: h.vault.SecretID, Clock: h.clock,
		Logger: slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	return h
}

func (h *tokenHarness) client(cfg vaultkv.Config) *vaultkv.Client {
	h.t.Helper()
	c, err := vaultkv.New(context.Background(), cfg)
	if err != nil {
		h.t.Fatalf("New: %v", err)
	}
	return c
}

// keepAlive runs c.KeepTokenAlive until the test ends.
func (h *tokenHarness) keepAlive(c *vaultkv.Client) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.KeepTokenAlive(ctx)
	}()
	h.t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			h.t.Error("KeepTokenAlive did not return after ctx was cancelled")
		}
	})
	h.waitArmed()
}

// waitArmed waits until the keep-alive loop waits on the clock (it has
// finished what the last Advance made due).
func (h *tokenHarness) waitArmed() {
	h.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		changed := h.clock.Changed()
		if h.clock.Waiters() > 0 {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			h.t.Fatal("the keep-alive loop never waited on the clock")
		}
	}
}

// run moves the clock by total in steps of a second, letting the loop do
// what falls due at each step.
func (h *tokenHarness) run(total time.Duration, each func()) {
	h.t.Helper()
	for elapsed := time.Duration(0); elapsed < total; elapsed += time.Second {
		h.clock.Advance(time.Second)
		h.waitArmed()
		if each != nil {
			each()
		}
	}
}

func (h *tokenHarness) read(c *vaultkv.Client) {
	h.t.Helper()
	got, err := c.Read(context.Background())
	if err != nil {
		h.t.Fatalf("Read at %s: %v", h.clock.Now().Format(time.TimeOnly), err)
	}
	if pw, _ := got.String("password"); pw != "pw" {
		h.t.Fatalf("Read = %+v", got)
	}
}

func (h *tokenHarness) noCredentialsLogged(secrets ...string) {
	h.t.Helper()
	for _, s := range append(secrets, h.vault.RootToken, h.vault.SecretID, "hvs.", "hvb.") {
		if s != "" && strings.Contains(h.logs.String(), s) {
			h.t.Errorf("a credential (%.4s…) reached the log", s)
		}
	}
}

// Over ten minutes of (fake) time, the client refreshes its AppRole token
// before each TTL ends, never more often: a batch token (not renewable)
// means one login per two thirds of the TTL, not a login loop; a service
// token is renewed until its max TTL and only then replaced by a login.
// The secret id's uses are counted as Vault does.
func TestKeepAliveBoundsLogins(t *testing.T) {
	const window = 10 * time.Minute
	for _, tc := range []struct {
		name                 string
		opts                 kvtest.Options
		minLogins, maxLogins int
		renewals             bool
	}{
		// A login at 0s, then every 20s: 31 in ten minutes.
		{"batch token", kvtest.Options{TokenTTL: 30 * time.Second, Batch: true, SecretIDUses: 40}, 25, 31, false},
		// Renewed every 20s until the 2m max TTL; a login at about 114s each.
		{"service token with max TTL", kvtest.Options{TokenTTL: 30 * time.Second, MaxTTL: 2 * time.Minute, SecretIDUses: 40}, 3, 7, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newTokenHarness(t, tc.opts)
			c := h.client(h.cfg)
			h.keepAlive(c)
			h.run(window, func() { h.read(c) })
			if n := h.vault.Logins(); n < tc.minLogins || n > tc.maxLogins {
				t.Errorf("%d logins in %s, want %d to %d", n, window, tc.minLogins, tc.maxLogins)
			}
			if left := h.vault.SecretIDUsesLeft(h.vault.SecretID); left < 40-tc.maxLogins {
				t.Errorf("the secret id has %d uses left", left)
			}
			if renewed := len(h.vault.Renewals()) > 0; renewed != tc.renewals {
				t.Errorf("renewed: %v, want %v", renewed, tc.renewals)
			}
			h.noCredentialsLogged()
		})
	}
}

// A token shorter-lived than the floor is refreshed no sooner than
// MinRefreshDelay after the last refresh: never a loop.
func TestKeepAliveRefreshFloor(t *testing.T) {
	h := newTokenHarness(t, kvtest.Options{TokenTTL: time.Second, Batch: true})
	c := h.client(h.cfg)
	h.keepAlive(c)
	for i := 0; i < 3; i++ {
		if n := h.clock.WaitersUntil(h.clock.Now().Add(vaultkv.MinRefreshDelay - time.Millisecond)); n != 0 {
			t.Fatalf("the next refresh is due sooner than %s", vaultkv.MinRefreshDelay)
		}
		h.clock.Advance(vaultkv.MinRefreshDelay)
		h.waitArmed()
	}
	if n := h.vault.Logins(); n != 4 {
		t.Errorf("%d logins over 3 floors, want 4", n)
	}
}

// A renewable token client renews at two thirds of the TTL, with the
// configured token.
func TestKeepAliveRenewsToken(t *testing.T) {
	h := newTokenHarness(t, kvtest.Options{TokenTTL: 30 * time.Second})
	cfg := h.cfg
	cfg.Auth, cfg.Token = vaultkv.AuthToken, h.vault.RootToken
	c := h.client(cfg)
	h.keepAlive(c)
	h.run(5*time.Minute, nil)
	h.read(c)
	if n := len(h.vault.Renewals()); n < 10 || n > 15 {
		t.Errorf("%d renewals in 5m of a 30s token, want about 15", n)
	}
	for len(h.vault.Renewals()) > 0 {
		if tok := <-h.vault.Renewals(); tok != h.vault.RootToken {
			t.Fatal("renewed another token than the configured one")
		}
	}
	h.noCredentialsLogged()
}

// A re-login that fails (Vault away for a while) is retried with backoff
// until it works, and the reads work again: one failure does not end the
// token's refreshes until a restart.
func TestKeepAliveRetriesFailedLogin(t *testing.T) {
	h := newTokenHarness(t, kvtest.Options{TokenTTL: 30 * time.Second, Batch: true})
	c := h.client(h.cfg)
	h.keepAlive(c)
	h.vault.FailLogins(5)
	// The first refresh is due at 20s; five failures take at most
	// 1+2+4+8+16 = 31s of backoff.
	h.run(60*time.Second, nil)
	if n := h.vault.Logins(); n < 2 {
		t.Fatalf("%d logins after the failures, want the loop to have logged in again", n)
	}
	h.read(c)
	// And it keeps going on schedule afterwards, without a loop.
	before := h.vault.Logins()
	h.run(2*time.Minute, func() { h.read(c) })
	if n := h.vault.Logins() - before; n < 5 || n > 7 {
		t.Errorf("%d logins in 2m after recovering, want about 6", n)
	}
	if !strings.Contains(h.logs.String(), "retrying") {
		t.Error("the failed refresh was not logged")
	}
	h.noCredentialsLogged()
}

// A read whose token Vault no longer accepts (expired while the broker was
// suspended, revoked) logs in again once and succeeds; a 403 for a valid
// token (the policy says no) costs no login.
func TestReadLogsInAgainOnForbidden(t *testing.T) {
	h := newTokenHarness(t, kvtest.Options{TokenTTL: 30 * time.Second, Batch: true})
	c := h.client(h.cfg)
	h.clock.Advance(time.Minute) // the token expired; nobody refreshed it
	h.read(c)
	if n := h.vault.Logins(); n != 2 {
		t.Errorf("%d logins, want 2 (start and after the 403)", n)
	}
	h.vault.DenyPaths(func(string) bool { return true })
	if _, err := c.Read(context.Background()); err == nil || !strings.Contains(err.Error(), "403") {
		t.Errorf("Read under a denying policy: %v, want the 403", err)
	}
	if n := h.vault.Logins(); n != 2 {
		t.Errorf("%d logins after a policy 403, want still 2", n)
	}
	h.noCredentialsLogged()
}

// tokenVar stands in for a token file that Vault Agent rewrites.
type tokenVar struct {
	mu  sync.Mutex
	tok string
}

func (v *tokenVar) set(tok string) { v.mu.Lock(); v.tok = tok; v.mu.Unlock() }
func (v *tokenVar) get() (string, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.tok, nil
}

// tokenAuthFromSource is token auth with the token at src.
func (h *tokenHarness) tokenAuthFromSource(src *tokenVar) vaultkv.Config {
	cfg := h.cfg
	cfg.Auth, cfg.TokenSource, cfg.PollInterval = vaultkv.AuthToken, src.get, time.Minute
	return cfg
}

// A token replaced at its source (Vault Agent rewrote the token file) is
// used as soon as Vault refuses the old one.
func TestTokenSourceChangeOnForbidden(t *testing.T) {
	h := newTokenHarness(t, kvtest.Options{})
	src := &tokenVar{tok: h.vault.RootToken}
	c := h.client(h.tokenAuthFromSource(src))
	h.read(c)
	src.set(h.vault.NewToken())
	h.vault.RevokeTokens() // the old one is gone, the new one too
	if _, err := c.Read(context.Background()); err == nil {
		t.Fatal("Read succeeded with every token revoked")
	}
	next := h.vault.NewToken()
	src.set(next)
	h.read(c)
	if h.vault.TokenUses(next) < 2 { // lookup and read
		t.Error("the new token was not used")
	}
	h.noCredentialsLogged(next)
}

// A token replaced at its source is picked up at the next poll, before
// Vault refuses the old one.
func TestTokenSourceChangePolled(t *testing.T) {
	h := newTokenHarness(t, kvtest.Options{})
	src := &tokenVar{tok: h.vault.RootToken}
	c := h.client(h.tokenAuthFromSource(src))
	h.keepAlive(c)
	next := h.vault.NewToken()
	src.set(next)
	h.run(time.Minute, nil)
	usedOld := h.vault.TokenUses(h.vault.RootToken)
	h.read(c)
	if h.vault.TokenUses(h.vault.RootToken) != usedOld {
		t.Error("the read went out with the old token after the poll")
	}
	if h.vault.TokenUses(next) < 2 {
		t.Error("the new token was not used")
	}
	h.noCredentialsLogged(next)
}

// The secret id is read anew at each login: a new one an operator wrote
// (the old one used up) is the one used.
func TestSecretIDSourceAtLogin(t *testing.T) {
	h := newTokenHarness(t, kvtest.Options{TokenTTL: 30 * time.Second, Batch: true, SecretIDUses: 1})
	src := &tokenVar{tok: h.vault.SecretID}
	cfg := h.cfg
	cfg.SecretID, cfg.SecretIDSource = "", src.get
	c := h.client(cfg)
	if left := h.vault.SecretIDUsesLeft(h.vault.SecretID); left != 0 {
		t.Fatalf("the first secret id has %d uses left, want 0", left)
	}
	next := h.vault.NewSecretID(0)
	src.set(next)
	h.keepAlive(c)
	h.run(30*time.Second, nil)
	if n := h.vault.Logins(); n != 2 {
		t.Fatalf("%d logins, want 2", n)
	}
	h.read(c)
	h.noCredentialsLogged(next)
}
