// Package vaultkv reads and writes one secret of a Vault KV version 2
// mount, where a target's root (admin) password can live. It logs in with a
// token or with AppRole and keeps its Vault token usable (see token.go):
// it renews a renewable token, logs in again (AppRole) or re-reads the
// token (token auth) before the token's TTL ends, retries a failure with a
// capped backoff, and re-authenticates once when Vault refuses a read or a
// write with 403.
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
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/credbroker/credbroker/broker"
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
	// Token is the Vault token (AuthToken), when TokenSource is nil.
	Token string
	// TokenSource, if set, returns the current Vault token (AuthToken).
	// It is called at start, on every refresh of the token and when Vault
	// refuses a request with 403, so a token that Vault Agent rewrites on
	// disk is picked up. Its errors must not hold the token.
	TokenSource func() (string, error)
	// AppRoleMount is the AppRole auth mount; "" is "approle".
	AppRoleMount string
	// RoleID and SecretID log in with AppRole (SecretID when
	// SecretIDSource is nil).
	RoleID, SecretID string
	// SecretIDSource, if set, returns the current secret id; it is called
	// before every AppRole login. Its errors must not hold the secret id.
	SecretIDSource func() (string, error)
	// PollInterval is how often a token that cannot be renewed (token
	// auth) is re-read from TokenSource for a new one; 0 is
	// DefaultPollInterval.
	PollInterval time.Duration
	// CACert is a PEM file of the CA that signed Vault's certificate; ""
	// uses the system pool.
	CACert string
	// HTTPClient, if set, replaces the default transport (tests).
	HTTPClient *http.Client
	// Clock schedules token refreshes; nil is the real time (tests set
	// internal/fakeclock).
	Clock broker.Clock
	// Logger receives token renewal events; nil discards them.
	Logger *slog.Logger
}

// Client is a logged-in Vault client for one KV v2 secret. It is safe for
// concurrent use.
type Client struct {
	cfg   Config
	vc    *api.Client
	log   *slog.Logger
	clock broker.Clock

	// authMu serialises logins, renewals and token switches, so the
	// keep-alive loop and a read that got 403 never both log in.
	authMu sync.Mutex
	mu     sync.Mutex // guards tok
	tok    tokenState
	// secrets are the last tokens and secret ids the client has held, for
	// scrub; older ones are expired and no request carries them any more.
	secrets []string
}

// rememberedSecrets bounds secrets: a batch token is replaced every few
// minutes for as long as brokerd runs.
const rememberedSecrets = 8

// Secret is one version of the KV secret.
type Secret struct {
	// Data is every field as Vault returned it: strings as string,
	// numbers as json.Number, and so on, so that writing it back keeps
	// each field's type.
	Data    map[string]any
	Version int
}

// String returns the field key if it is a string. A missing field is ""
// and no error; a field of another type is an error that names the key,
// never the value (it may be the password in another shape).
func (s Secret) String(key string) (string, error) {
	v, ok := s.Data[key]
	if !ok || v == nil {
		return "", nil
	}
	str, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("field %q is not a string", key)
	}
	return str, nil
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
	if cfg.Clock == nil {
		cfg.Clock = broker.SystemClock{}
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
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
	c := &Client{cfg: cfg, vc: vc, log: cfg.Logger, clock: cfg.Clock}
	c.authMu.Lock()
	defer c.authMu.Unlock()
	switch cfg.Auth {
	case AuthToken:
		tok, err := c.currentToken()
		if err != nil {
			return nil, err
		}
		if err := c.adoptToken(ctx, tok); err != nil {
			return nil, err
		}
	case AuthAppRole:
		if err := c.login(ctx); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("vault: unknown auth method %q (token or approle)", cfg.Auth)
	}
	return c, nil
}

// remember records a credential so scrub can remove it from errors.
func (c *Client) remember(s string) {
	if s == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, have := range c.secrets {
		if have == s {
			return
		}
	}
	c.secrets = append(c.secrets, s)
	if len(c.secrets) > rememberedSecrets {
		c.secrets = append(c.secrets[:0], c.secrets[len(c.secrets)-rememberedSecrets:]...)
	}
}

// scrub removes credentials from an error's text: Vault's errors quote
// request bodies rarely, but a token or secret id must never reach a log.
func (c *Client) scrub(err error) error {
	if err == nil {
		return nil
	}
	c.mu.Lock()
	secrets := append([]string{c.cfg.Token, c.cfg.SecretID, c.vc.Token()}, c.secrets...)
	c.mu.Unlock()
	msg := err.Error()
	changed := false
	for _, s := range secrets {
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

// Read returns the newest version of the secret. Fields of any type are
// returned as they are; a caller takes the string fields it needs with
// Secret.String.
func (c *Client) Read(ctx context.Context) (Secret, error) {
	var s *api.KVSecret
	err := c.withReauth(ctx, func() error {
		var err error
		s, err = c.vc.KVv2(c.cfg.Mount).Get(ctx, c.cfg.Path)
		return err
	})
	if err != nil {
		return Secret{}, fmt.Errorf("vault: reading %s/%s: %w", c.cfg.Mount, c.cfg.Path, c.scrub(err))
	}
	out := Secret{Data: make(map[string]any, len(s.Data))}
	if s.VersionMetadata != nil {
		out.Version = s.VersionMetadata.Version
	}
	for k, v := range s.Data {
		out.Data[k] = v
	}
	return out, nil
}

// ErrVersionConflict is returned by Write when the secret changed since the
// version the caller read (KV v2 check-and-set).
var ErrVersionConflict = errors.New("vault: the secret changed meanwhile (check-and-set failed)")

// Write stores data as a new version, only if the newest version is still
// cas (0: only if the secret does not exist). It returns the new version.
// Values are sent as they are: a json.Number that Read returned is written
// back as a number.
func (c *Client) Write(ctx context.Context, data map[string]any, cas int) (int, error) {
	var s *api.KVSecret
	err := c.withReauth(ctx, func() error {
		var err error
		s, err = c.vc.KVv2(c.cfg.Mount).Put(ctx, c.cfg.Path, data, api.WithCheckAndSet(cas))
		return err
	})
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

// String describes the secret without credentials, for logs.
func (c *Client) String() string {
	return fmt.Sprintf("vault %s %s/%s", c.cfg.Address, c.cfg.Mount, c.cfg.Path)
}
