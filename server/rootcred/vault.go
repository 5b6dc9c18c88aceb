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
	// The token or secret id is read each time a source is made (at
	// start-up), never kept in the configuration.
	var token, secretID Secret
	var err error
	if cfg.TokenFile != "" || cfg.TokenEnv != "" {
		if token, err = readCredential(cfg.TokenFile, cfg.TokenEnv); err != nil {
			return nil, fmt.Errorf("vault token: %w", err)
		}
	}
	if cfg.SecretIDFile != "" || cfg.SecretIDEnv != "" {
		if secretID, err = readCredential(cfg.SecretIDFile, cfg.SecretIDEnv); err != nil {
			return nil, fmt.Errorf("vault secret id: %w", err)
		}
	}
	c, err := vaultkv.New(ctx, vaultkv.Config{
		Address: cfg.Address, Namespace: cfg.Namespace, Mount: cfg.Mount, Path: cfg.Path,
		Auth: cfg.Auth, Token: token.Reveal(), AppRoleMount: cfg.AppRoleMount,
		RoleID: cfg.RoleID, SecretID: secretID.Reveal(), CACert: cfg.CACert, Logger: logger,
	})
	if err != nil {
		return nil, err
	}
	return &vaultSource{cfg: cfg, client: c}, nil
}

func (s *vaultSource) describe() string { return s.cfg.String() }

func (s *vaultSource) read(ctx context.Context) (rootState, error) {
	sec, err := s.client.Read(ctx)
	if err != nil {
		return rootState{}, err
	}
	st := rootState{current: sec.Data[s.cfg.Key], pending: sec.Data[s.cfg.Key+config.PendingSuffix], version: sec.Version, data: sec.Data}
	if st.current == "" {
		return rootState{}, fmt.Errorf("vault: %s: field %q is missing or empty", s.describe(), s.cfg.Key)
	}
	return st, nil
}

func (s *vaultSource) write(ctx context.Context, st rootState, current, pending string) (rootState, error) {
	data := make(map[string]string, len(st.data)+1)
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
