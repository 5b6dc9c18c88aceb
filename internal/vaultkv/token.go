package vaultkv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	"github.com/hashicorp/vault/api"
)

// The token's lifecycle. A token is refreshed (renewed if it can be, else
// replaced: an AppRole login, or the token source re-read) once two thirds
// of its TTL have passed, never sooner than MinRefreshDelay after the last
// refresh, so a token that cannot be renewed (a batch token) or a very
// short TTL never turns into a login loop: at most one login per
// MinRefreshDelay, and one per two thirds of the TTL in the normal case.
// A refresh that fails is retried after FirstRetryDelay, doubling up to
// MaxRetryDelay (with jitter), for as long as the client runs: Vault being
// away for a while must not leave the broker without a token until restart.
const (
	// MinRefreshDelay is the floor between two refreshes of the token.
	MinRefreshDelay = time.Second
	// FirstRetryDelay and MaxRetryDelay bound the backoff after a failed
	// refresh.
	FirstRetryDelay = time.Second
	MaxRetryDelay   = time.Minute
	// DefaultPollInterval is how often a token that cannot be renewed is
	// re-read from its source (token auth with a TokenSource).
	DefaultPollInterval = time.Minute
)

// tokenState is the token in use and what Vault said of it.
type tokenState struct {
	token     string
	obtained  time.Time     // when ttl was granted (login, lookup or renewal)
	ttl       time.Duration // 0: never expires
	renewable bool
	// increment is what a renewal asks for: the TTL the token was made
	// with. A renewal granting less has hit the token's max TTL (capped):
	// renewing again cannot help, only a new token can.
	increment time.Duration
	capped    bool
}

func (c *Client) state() tokenState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tok
}

func (c *Client) setState(st tokenState) {
	c.remember(st.token)
	c.mu.Lock()
	c.tok = st
	c.mu.Unlock()
	c.vc.SetToken(st.token)
}

// currentToken returns the token the configuration names now (token auth).
func (c *Client) currentToken() (string, error) {
	if c.cfg.TokenSource != nil {
		tok, err := c.cfg.TokenSource()
		if err != nil {
			return "", fmt.Errorf("vault: reading the token: %w", err)
		}
		if tok == "" {
			return "", errors.New("vault: the token source is empty")
		}
		c.remember(tok)
		return tok, nil
	}
	if c.cfg.Token == "" {
		return "", errors.New("vault: token auth needs a token")
	}
	return c.cfg.Token, nil
}

// currentSecretID returns the secret id the configuration names now.
func (c *Client) currentSecretID() (string, error) {
	if c.cfg.SecretIDSource != nil {
		id, err := c.cfg.SecretIDSource()
		if err != nil {
			return "", fmt.Errorf("vault: reading the secret id: %w", err)
		}
		c.remember(id)
		return id, nil
	}
	return c.cfg.SecretID, nil
}

// withToken returns a copy of the API client that sends tok ("" for none),
// for a request that must not change the token the others use.
func (c *Client) withToken(tok string) (*api.Client, error) {
	vc, err := c.vc.CloneWithHeaders() // the namespace is a header
	if err != nil {
		return nil, err
	}
	if tok == "" {
		vc.ClearToken()
	} else {
		vc.SetToken(tok)
	}
	return vc, nil
}

// lookup asks Vault about tok (lookup-self with tok).
func (c *Client) lookup(ctx context.Context, tok string) (*api.Secret, error) {
	vc, err := c.withToken(tok)
	if err != nil {
		return nil, err
	}
	return vc.Auth().Token().LookupSelfWithContext(ctx)
}

// adoptToken looks tok up and, if Vault knows it, makes it the token in
// use. The caller holds authMu.
func (c *Client) adoptToken(ctx context.Context, tok string) error {
	s, err := c.lookup(ctx, tok)
	if err != nil {
		return fmt.Errorf("vault: looking up the token: %w", c.scrub(err))
	}
	if s == nil || s.Data == nil {
		return errors.New("vault: looking up the token returned nothing")
	}
	ttl, _ := s.TokenTTL()
	renewable, _ := s.TokenIsRenewable()
	increment := ttl
	if n, ok := s.Data["creation_ttl"].(json.Number); ok {
		if secs, err := n.Int64(); err == nil && secs > 0 {
			increment = time.Duration(secs) * time.Second
		}
	}
	c.setState(tokenState{token: tok, obtained: c.clock.Now(), ttl: ttl, renewable: renewable, increment: increment})
	return nil
}

// login logs in with AppRole, reading the secret id anew. The caller holds
// authMu.
func (c *Client) login(ctx context.Context) error {
	secretID, err := c.currentSecretID()
	if err != nil {
		return err
	}
	if c.cfg.RoleID == "" || secretID == "" {
		return errors.New("vault: approle auth needs a role_id and a secret_id")
	}
	// Log in without a token: a stale one has no business on a login.
	vc, err := c.withToken("")
	if err != nil {
		return fmt.Errorf("vault: %w", err)
	}
	s, err := vc.Logical().WriteWithContext(ctx, "auth/"+c.cfg.AppRoleMount+"/login", map[string]any{
		"role_id": c.cfg.RoleID, "secret_id": secretID,
	})
	if err != nil {
		return fmt.Errorf("vault: approle login: %w", c.scrub(err))
	}
	if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
		return errors.New("vault: approle login returned no token")
	}
	ttl := time.Duration(s.Auth.LeaseDuration) * time.Second
	c.setState(tokenState{token: s.Auth.ClientToken, obtained: c.clock.Now(), ttl: ttl,
		renewable: s.Auth.Renewable, increment: ttl})
	c.log.Info("vault: logged in with approle", "ttl", ttl, "renewable", s.Auth.Renewable)
	return nil
}

// renew renews the token in use. The caller holds authMu.
func (c *Client) renew(ctx context.Context) error {
	st := c.state()
	s, err := c.vc.Auth().Token().RenewSelfWithContext(ctx, int(st.increment/time.Second))
	if err != nil {
		return fmt.Errorf("vault: renewing the token: %w", c.scrub(err))
	}
	if s == nil || s.Auth == nil {
		return errors.New("vault: renewing the token returned nothing")
	}
	granted := time.Duration(s.Auth.LeaseDuration) * time.Second
	st.obtained, st.ttl, st.renewable = c.clock.Now(), granted, s.Auth.Renewable
	st.capped = granted < st.increment
	c.setState(st)
	c.log.Debug("vault token renewed", "ttl", granted, "max_ttl_reached", st.capped)
	return nil
}

// refresh does what the token needs now: a token client picks up a new
// token from its source, or renews; an AppRole client renews while it can
// and logs in again when it cannot. The caller holds authMu.
func (c *Client) refresh(ctx context.Context) error {
	st := c.state()
	if c.cfg.Auth == AuthToken {
		tok, err := c.currentToken()
		if err != nil {
			return err
		}
		if tok != st.token {
			if err := c.adoptToken(ctx, tok); err != nil {
				return err
			}
			c.log.Info("vault: the token changed at its source; using the new one")
			return nil
		}
		if !st.renewable || st.capped || c.clock.Now().Before(c.refreshAt(st)) {
			return nil // only a new token at the source can help, or not due yet
		}
		return c.renew(ctx)
	}
	if st.renewable && !st.capped {
		err := c.renew(ctx)
		if err == nil {
			return nil
		}
		c.log.Warn("vault token renewal failed; logging in again", "err", err)
	}
	return c.login(ctx)
}

// refreshAt is when a token is due: two thirds into its TTL.
func (c *Client) refreshAt(st tokenState) time.Time {
	return st.obtained.Add(st.ttl * 2 / 3)
}

// untilRefresh is how long to wait before the next refresh.
func (c *Client) untilRefresh() time.Duration {
	st := c.state()
	var d time.Duration
	switch {
	case c.cfg.Auth == AuthToken && (!st.renewable || st.capped || st.ttl == 0):
		d = c.cfg.PollInterval // wait for a new token at the source
	case st.ttl == 0:
		d = c.cfg.PollInterval // never expires: nothing is due
	default:
		d = c.refreshAt(st).Sub(c.clock.Now())
		if c.cfg.Auth == AuthToken && c.cfg.TokenSource != nil {
			d = min(d, c.cfg.PollInterval)
		}
	}
	return max(d, MinRefreshDelay)
}

// retryDelay is the wait before retry n (1, 2, ...) of a failed refresh:
// FirstRetryDelay doubling up to MaxRetryDelay, of which a random half, so
// brokers sharing an AppRole do not retry in step.
func retryDelay(n int) time.Duration {
	d := MaxRetryDelay
	if n < 7 {
		d = min(FirstRetryDelay<<(n-1), MaxRetryDelay)
	}
	return d/2 + rand.N(d/2+1)
}

// KeepTokenAlive keeps the client's token usable until ctx is done: it
// refreshes the token at two thirds of its TTL (renewal, or a new login
// or token when renewal cannot help) and retries a failed refresh with a
// capped backoff, without end. A token client with a fixed token that
// cannot be renewed has nothing to do and returns at once.
func (c *Client) KeepTokenAlive(ctx context.Context) {
	if st := c.state(); c.cfg.Auth == AuthToken && c.cfg.TokenSource == nil && !st.renewable {
		c.log.Info("vault token is not renewable; nothing to keep alive")
		return
	}
	failures := 0
	delay := c.untilRefresh()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.clock.After(delay):
		}
		c.authMu.Lock()
		err := c.refresh(ctx)
		c.authMu.Unlock()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			delay = retryDelay(failures)
			c.log.Error("vault: refreshing the token failed; retrying", "err", err, "attempt", failures, "retry_in", delay)
			continue
		}
		if failures > 0 {
			c.log.Info("vault: the token is refreshed again", "failed_attempts", failures)
		}
		failures = 0
		delay = c.untilRefresh()
	}
}

// errNoNewToken: Vault refused the token and the source has no other.
var errNoNewToken = errors.New("the token source holds no new token")

// withReauth runs op and, if Vault refuses it with 403 because the token is
// no longer valid, gets a new token (AppRole: logs in; token auth: re-reads
// the token source) and runs op once more. A 403 for a token that is still
// valid is a policy answer and is returned as it is, so a missing policy
// costs no logins (and no secret id uses).
func (c *Client) withReauth(ctx context.Context, op func() error) error {
	used := c.vc.Token()
	err := op()
	var re *api.ResponseError
	if !errors.As(err, &re) || re.StatusCode != http.StatusForbidden {
		return err
	}
	if rerr := c.reauth(ctx, used); rerr != nil {
		c.log.Debug("vault refused the token and no new one could be had", "err", rerr)
		return err
	}
	return op()
}

func (c *Client) reauth(ctx context.Context, used string) error {
	c.authMu.Lock()
	defer c.authMu.Unlock()
	if c.vc.Token() != used {
		return nil // another caller has replaced the token meanwhile
	}
	switch c.cfg.Auth {
	case AuthToken:
		tok, err := c.currentToken()
		if err != nil {
			return err
		}
		if tok == used {
			return errNoNewToken
		}
		if err := c.adoptToken(ctx, tok); err != nil {
			return err
		}
		c.log.Info("vault: the token changed at its source; using the new one")
		return nil
	default:
		_, err := c.lookup(ctx, used)
		var re *api.ResponseError
		switch {
		case err == nil:
			return errors.New("the token is still valid: the 403 is the policy's answer")
		case !errors.As(err, &re) || re.StatusCode != http.StatusForbidden:
			return fmt.Errorf("checking the token: %w", c.scrub(err))
		}
		return c.login(ctx)
	}
}
