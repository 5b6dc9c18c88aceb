package rootcred

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/credbroker/credbroker/internal/vaultkv"
	"github.com/credbroker/credbroker/server/config"
)

// vaultSource keeps the password in field Key of a KV v2 secret; a
// rotation's intent is the field Key+"_pending" of the same secret, and
// every write is check-and-set against the version read.
type vaultSource struct {
	cfg    *config.Vault
	client *vaultkv.Client
}

func newVaultSource(ctx context.Context, cfg *config.Vault, logger *slog.Logger) (*vaultSource, error) {
	// The token and the secret id are read from their file (or variable)
	// each time vaultkv needs them — at start-up, before every AppRole login,
	// and for the token on every refresh and when Vault refuses it — so one
	// that Vault Agent or an operator replaces on disk is picked up without
	// a restart. They are never kept in the configuration.
	vcfg := vaultkv.Config{
		Address: cfg.Address, Namespace: cfg.Namespace, Mount: cfg.Mount, Path: cfg.Path,
		Auth: cfg.Auth, AppRoleMount: cfg.AppRoleMount, RoleID: cfg.RoleID, CACert: cfg.CACert,
		PollInterval: cfg.RefreshInterval, Logger: logger,
	}
	if cfg.TokenFile != "" || cfg.TokenEnv != "" {
		vcfg.TokenSource = credentialSource(cfg.TokenFile, cfg.TokenEnv)
	}
	if cfg.SecretIDFile != "" || cfg.SecretIDEnv != "" {
		vcfg.SecretIDSource = credentialSource(cfg.SecretIDFile, cfg.SecretIDEnv)
	}
	c, err := vaultkv.New(ctx, vcfg)
	if err != nil {
		return nil, err
	}
	return &vaultSource{cfg: cfg, client: c}, nil
}

// credentialSource reads a Vault credential from file or env on each call.
func credentialSource(file, env string) func() (string, error) {
	return func() (string, error) {
		s, err := readCredential(file, env)
		return s.Reveal(), err
	}
}

func (s *vaultSource) describe() string { return s.cfg.String() }

// read takes the two fields the broker uses; the secret's other fields,
// of whatever type (port: 5432), are kept as they are for writing back.
func (s *vaultSource) read(ctx context.Context) (rootState, error) {
	sec, err := s.client.Read(ctx)
	if err != nil {
		return rootState{}, err
	}
	st := rootState{version: sec.Version, data: sec.Data}
	if st.current, err = sec.String(s.cfg.Key); err != nil {
		return rootState{}, fmt.Errorf("vault: %s: %w", s.describe(), err)
	}
	if st.pending, err = sec.String(s.cfg.Key + config.PendingSuffix); err != nil {
		return rootState{}, fmt.Errorf("vault: %s: %w", s.describe(), err)
	}
	if st.current == "" {
		return rootState{}, fmt.Errorf("vault: %s: field %q is missing or empty", s.describe(), s.cfg.Key)
	}
	return st, nil
}

// write stores current and pending over a copy of the secret read, so every
// other field is written back unchanged (a number stays a number).
func (s *vaultSource) write(ctx context.Context, st rootState, current, pending string) (rootState, error) {
	data := make(map[string]any, len(st.data)+1)
	for k, v := range st.data {
		data[k] = v
	}
	data[s.cfg.Key] = current
	delete(data, s.cfg.Key+config.PendingSuffix)
	if pending != "" {
		data[s.cfg.Key+config.PendingSuffix] = pending
	}
	version, err := s.client.Write(ctx, data, st.version)
	if err != nil {
		return rootState{}, err
	}
	return rootState{current: current, pending: pending, version: version, data: data}, nil
}

func (s *vaultSource) stage(ctx context.Context, st rootState, next string) (rootState, error) {
	return s.write(ctx, st, st.current, next)
}

func (s *vaultSource) commit(ctx context.Context, st rootState) error {
	_, err := s.write(ctx, st, st.pending, "")
	return err
}

func (s *vaultSource) abort(ctx context.Context, st rootState) error {
	_, err := s.write(ctx, st, st.current, "")
	return err
}

func (s *vaultSource) refreshInterval() time.Duration { return s.cfg.RefreshInterval }

func (s *vaultSource) keepAlive(ctx context.Context) { s.client.KeepTokenAlive(ctx) }
