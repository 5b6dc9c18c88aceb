// Package vaultkv reads and writes one secret of a Vault KV version 2
// mount, where a target's root (admin) password can live. It logs in with a
// token or with AppRole, and keeps its own Vault token alive with the Vault
// API's lifetime watcher, logging in again (AppRole) when the token reaches
// its max TTL.
//
// Errors never hold a token, a secret id or a secret's value.
package vaultkv

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"

	"github.com/hashicorp/vault/api"
)

// Auth methods.
const (
	AuthToken   = "token"
	AuthAppRole = "approle"
)

// Config says where the secret is and how to log in.
type Config struct {
	// Address is Vault's URL, https://vault.example:8200.
	Address string
	// Namespace is the Vault Enterprise namespace, if any.
	Namespace string
	// Mount is the KV v2 mount path ("secret").
	Mount string
	// Path is the secret's path under the mount ("credbroker/main").
	Path string
	// Auth is AuthToken or AuthAppRole.
	Auth string
	// Token is the Vault token (AuthToken).
	Token string
	// AppRoleMount is the AppRole auth mount; "" is "approle".
	AppRoleMount string
	// RoleID and SecretID log in with AppRole.
	RoleID, SecretID string
	// CACert is a PEM file of the CA that signed Vault's certificate; ""
	// uses the system pool.
	CACert string
	// HTTPClient, if set, replaces the default transport (tests).
	HTTPClient *http.Client
	// Logger receives token renewal events; nil discards them.
	Logger *slog.Logger
}

// Client is a logged-in Vault client for one KV v2 secret. It is safe for
// concurrent use.
type Client struct {
	cfg Config
	vc  *api.Client
	log *slog.Logger

	mu   sync.Mutex
	auth *api.Secret // the login (or token lookup) whose token is renewed
}

// Secret is one version of the KV secret.
type Secret struct {
	Data    map[string]string
	Version int
}

// New builds the client and logs in.
func New(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.Address == "" || cfg.Mount == "" || cfg.Path == "" {
		return nil, errors.New("vault: address, mount and path are required")
	}
	if cfg.AppRoleMount == "" {
		cfg.AppRoleMount = "approle"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	vcfg := api.DefaultConfig()
	if vcfg.Error != nil {
		return nil, fmt.Errorf("vault: %w", vcfg.Error)
	}
	vcfg.Address = cfg.Address
	if cfg.HTTPClient != nil {
		vcfg.HttpClient = cfg.HTTPClient
	}
	if cfg.CACert != "" {
		if err := vcfg.ConfigureTLS(&api.TLSConfig{CACert: cfg.CACert}); err != nil {
			return nil, fmt.Errorf("vault: ca_cert: %w", err)
		}
	}
	// Retries are ours to decide (the caller re-reads on its own schedule).
	vcfg.MaxRetries = 0
	vc, err := api.NewClient(vcfg)
	if err != nil {
		return nil, fmt.Errorf("vault: %w", err)
	}
	// The API client picks up VAULT_TOKEN and friends from the environment;
	// only what the configuration says counts.
	vc.ClearToken()
	if cfg.Namespace != "" {
		vc.SetNamespace(cfg.Namespace)
	}
	c := &Client{cfg: cfg, vc: vc, log: cfg.Logger}
	if err := c.login(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// login authenticates and remembers the token's lease for renewal.
func (c *Client) login(ctx context.Context) error {
	switch c.cfg.Auth {
	case AuthToken:
		if c.cfg.Token == "" {
			return errors.New("vault: token auth needs a token")
		}
		c.vc.SetToken(c.cfg.Token)
		s, err := c.vc.Auth().Token().LookupSelfWithContext(ctx)
		if err != nil {
			return fmt.Errorf("vault: looking up the token: %w", c.scrub(err))
		}
		ttl, _ := s.TokenTTL()
		renewable, _ := s.TokenIsRenewable()
		c.setAuth(&api.Secret{Auth: &api.SecretAuth{
			ClientToken: c.cfg.Token, Renewable: renewable, LeaseDuration: int(ttl.Seconds()),
		}})
		return nil
	case AuthAppRole:
		if c.cfg.RoleID == "" || c.cfg.SecretID == "" {
			return errors.New("vault: approle auth needs a role_id and a secret_id")
		}
		s, err := c.vc.Logical().WriteWithContext(ctx, "auth/"+c.cfg.AppRoleMount+"/login", map[string]any{
			"role_id": c.cfg.RoleID, "secret_id": c.cfg.SecretID,
		})
		if err != nil {
			return fmt.Errorf("vault: approle login: %w", c.scrub(err))
		}
		if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
			return errors.New("vault: approle login returned no token")
		}
		c.vc.SetToken(s.Auth.ClientToken)
		c.setAuth(s)
		return nil
	default:
		return fmt.Errorf("vault: unknown auth method %q (token or approle)", c.cfg.Auth)
	}
}

func (c *Client) setAuth(s *api.Secret) {
	c.mu.Lock()
	c.auth = s
	c.mu.Unlock()
}

// scrub removes credentials from an error's text: Vault's errors quote
// request bodies rarely, but a token or secret id must never reach a log.
func (c *Client) scrub(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	changed := false
	for _, s := range []string{c.cfg.Token, c.cfg.SecretID, c.vc.Token()} {
		if s != "" && strings.Contains(msg, s) {
			msg = strings.ReplaceAll(msg, s, "[REDACTED]")
			changed = true
		}
	}
	if !changed {
		return err
	}
	return errors.New(msg)
}

// Read returns the newest version of the secret.
func (c *Client) Read(ctx context.Context) (Secret, error) {
	s, err := c.vc.KVv2(c.cfg.Mount).Get(ctx, c.cfg.Path)
	if err != nil {
		return Secret{}, fmt.Errorf("vault: reading %s/%s: %w", c.cfg.Mount, c.cfg.Path, c.scrub(err))
	}
	out := Secret{Data: map[string]string{}}
	if s.VersionMetadata != nil {
		out.Version = s.VersionMetadata.Version
	}
	for k, v := range s.Data {
		str, ok := v.(string)
		if !ok {
			// Never print the value: it may be the password in another shape.
			return Secret{}, fmt.Errorf("vault: %s/%s: key %q is not a string", c.cfg.Mount, c.cfg.Path, k)
		}
		out.Data[k] = str
	}
	return out, nil
}

// ErrVersionConflict is returned by Write when the secret changed since the
// version the caller read (KV v2 check-and-set).
var ErrVersionConflict = errors.New("vault: the secret changed meanwhile (check-and-set failed)")

// Write stores data as a new version, only if the newest version is still
// cas (0: only if the secret does not exist). It returns the new version.
func (c *Client) Write(ctx context.Context, data map[string]string, cas int) (int, error) {
	d := make(map[string]any, len(data))
	for k, v := range data {
		d[k] = v
	}
	s, err := c.vc.KVv2(c.cfg.Mount).Put(ctx, c.cfg.Path, d, api.WithCheckAndSet(cas))
	if err != nil {
		var re *api.ResponseError
		if errors.As(err, &re) && re.StatusCode == http.StatusBadRequest && strings.Contains(strings.Join(re.Errors, " "), "check-and-set") {
			return 0, ErrVersionConflict
		}
		return 0, fmt.Errorf("vault: writing %s/%s: %w", c.cfg.Mount, c.cfg.Path, c.scrub(err))
	}
	if s.VersionMetadata == nil {
		return 0, errors.New("vault: the write returned no version")
	}
	return s.VersionMetadata.Version, nil
}

// KeepTokenAlive renews the client's Vault token with the API's lifetime
// watcher until ctx is done. When the token cannot be renewed any more
// (its max TTL), an AppRole client logs in again; a token client keeps
// its token until Vault refuses it (and says so in the log). It returns
// when ctx is done.
func (c *Client) KeepTokenAlive(ctx context.Context) {
	for ctx.Err() == nil {
		c.mu.Lock()
		auth := c.auth
		c.mu.Unlock()
		if auth == nil || auth.Auth == nil || !auth.Auth.Renewable {
			if c.cfg.Auth == AuthToken {
				c.log.Info("vault token is not renewable; nothing to keep alive")
				return
			}
		} else {
			w, err := c.vc.NewLifetimeWatcher(&api.LifetimeWatcherInput{Secret: auth})
			if err != nil {
				c.log.Error("vault token watcher", "err", c.scrub(err))
				return
			}
			go w.Start()
			done := c.watch(ctx, w)
			w.Stop()
			if !done {
				return // ctx
			}
			if c.cfg.Auth == AuthToken {
				c.log.Warn("vault token can no longer be renewed; it will expire at its max TTL")
				return
			}
		}
		if err := c.login(ctx); err != nil {
			c.log.Error("vault approle login failed", "err", err)
			return
		}
		c.log.Info("vault: logged in again with approle")
	}
}

// watch reports renewals until the watcher is done (true) or ctx is (false).
func (c *Client) watch(ctx context.Context, w *api.LifetimeWatcher) bool {
	for {
		select {
		case <-ctx.Done():
			return false
		case err := <-w.DoneCh():
			if err != nil {
				c.log.Warn("vault token renewal stopped", "err", c.scrub(err))
			}
			return true
		case r := <-w.RenewCh():
			if r != nil && r.Secret != nil && r.Secret.Auth != nil {
				c.log.Debug("vault token renewed", "lease_seconds", r.Secret.Auth.LeaseDuration)
			}
		}
	}
}

// String describes the secret without credentials, for logs.
func (c *Client) String() string {
	return fmt.Sprintf("vault %s %s/%s", c.cfg.Address, c.cfg.Mount, c.cfg.Path)
}
