package config

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/credbroker/credbroker/internal/vaultkv"
)

// VaultFile is targets[].vault: the admin password in a Vault KV v2 secret.
//
//	vault:
//	  address: https://vault.example:8200
//	  mount: secret                  # the KV v2 mount (default secret)
//	  path: credbroker/main          # the secret under it
//	  key: password                  # the field holding the password (default password)
//	  auth: approle                  # or token
//	  role_id: 9f1c...               # approle: not secret on its own
//	  secret_id_file: /etc/credbroker/vault-secret-id   # or secret_id_env
//	  # token_file / token_env for auth: token
//	  ca_cert: /etc/credbroker/vault-ca.pem
//	  refresh_interval: 1m           # how often the secret is re-read
type VaultFile struct {
	Address         string `yaml:"address"`
	Namespace       string `yaml:"namespace"`
	Mount           string `yaml:"mount"`
	Path            string `yaml:"path"`
	Key             string `yaml:"key"`
	Auth            string `yaml:"auth"`
	TokenFile       string `yaml:"token_file"`
	TokenEnv        string `yaml:"token_env"`
	AppRoleMount    string `yaml:"approle_mount"`
	RoleID          string `yaml:"role_id"`
	SecretIDFile    string `yaml:"secret_id_file"`
	SecretIDEnv     string `yaml:"secret_id_env"`
	CACert          string `yaml:"ca_cert"`
	RefreshInterval string `yaml:"refresh_interval"`
}

// Vault is a validated targets[].vault.
type Vault struct {
	Address, Namespace, Mount, Path, Key string
	// Auth is vaultkv.AuthToken or vaultkv.AuthAppRole.
	Auth         string
	Token        Secret
	AppRoleMount string
	RoleID       string
	SecretID     Secret
	CACert       string
	// RefreshInterval: how often the secret is re-read for changes.
	RefreshInterval time.Duration
}

// Defaults of targets[].vault.
const (
	DefaultVaultMount      = "secret"
	DefaultVaultKey        = "password"
	DefaultRefreshInterval = time.Minute
)

// pendingSuffix names the field (Vault) or file (password_file) holding a
// rotation's new password until it is known to be the server's.
const pendingSuffix = "_pending"

// vault validates targets[].vault, reading the token or secret id from its
// file or environment variable.
func (v *validator) vault(p string, f *File, vf *VaultFile) *Vault {
	out := &Vault{
		Address: vf.Address, Namespace: vf.Namespace, Mount: vf.Mount, Path: strings.Trim(vf.Path, "/"),
		Key: vf.Key, Auth: vf.Auth, AppRoleMount: vf.AppRoleMount, RoleID: vf.RoleID,
		RefreshInterval: v.duration(p+".refresh_interval", vf.RefreshInterval, DefaultRefreshInterval),
	}
	if out.Mount == "" {
		out.Mount = DefaultVaultMount
	}
	if out.Key == "" {
		out.Key = DefaultVaultKey
	}
	if strings.HasSuffix(out.Key, pendingSuffix) {
		v.errorf(p+".key", "%q ends in %s, which credbroker uses for a rotation in progress", out.Key, pendingSuffix)
	}
	switch u, err := url.Parse(out.Address); {
	case out.Address == "":
		v.errorf(p+".address", "required (https://vault.example:8200)")
	case err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "":
		v.errorf(p+".address", "not an http(s) URL")
	case u.User != nil:
		v.errorf(p+".address", "must not contain credentials")
	}
	if out.Path == "" {
		v.errorf(p+".path", "required (the secret's path under the KV v2 mount)")
	}
	if vf.CACert != "" {
		out.CACert = f.path(vf.CACert)
	}
	switch out.Auth {
	case vaultkv.AuthToken:
		out.Token = v.credential(p, f, "token", vf.TokenFile, vf.TokenEnv)
	case vaultkv.AuthAppRole:
		if out.RoleID == "" {
			v.errorf(p+".role_id", "required for auth: approle")
		}
		out.SecretID = v.credential(p, f, "secret_id", vf.SecretIDFile, vf.SecretIDEnv)
		if out.AppRoleMount == "" {
			out.AppRoleMount = "approle"
		}
	case "":
		v.errorf(p+".auth", "required (token or approle)")
	default:
		v.errorf(p+".auth", "%q is not an auth method; use token or approle", out.Auth)
	}
	return out
}

// credential reads a Vault credential from <name>_file or <name>_env.
func (v *validator) credential(p string, f *File, name, file, env string) Secret {
	switch {
	case file != "" && env != "":
		v.errorf(p, "set %s_file or %s_env, not both", name, name)
	case file != "":
		s, _ := v.passwordFile(p+"."+name+"_file", f.path(file))
		return s
	case env != "":
		s, _ := v.passwordEnv(p+"."+name+"_env", env)
		return s
	default:
		v.errorf(p, "auth needs %s_file or %s_env", name, name)
	}
	return ""
}

func (vt *Vault) String() string {
	return fmt.Sprintf("vault %s %s/%s#%s", vt.Address, vt.Mount, vt.Path, vt.Key)
}

// vaultSource keeps the password in field Key of a KV v2 secret; a
// rotation's intent is the field Key+"_pending" of the same secret, and
// every write is check-and-set against the version read.
type vaultSource struct {
	cfg    *Vault
	client *vaultkv.Client
}

func newVaultSource(ctx context.Context, cfg *Vault, logger *slog.Logger) (*vaultSource, error) {
	c, err := vaultkv.New(ctx, vaultkv.Config{
		Address: cfg.Address, Namespace: cfg.Namespace, Mount: cfg.Mount, Path: cfg.Path,
		Auth: cfg.Auth, Token: cfg.Token.Reveal(), AppRoleMount: cfg.AppRoleMount,
		RoleID: cfg.RoleID, SecretID: cfg.SecretID.Reveal(), CACert: cfg.CACert, Logger: logger,
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
	st := rootState{current: sec.Data[s.cfg.Key], pending: sec.Data[s.cfg.Key+pendingSuffix], version: sec.Version, data: sec.Data}
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
	delete(data, s.cfg.Key+pendingSuffix)
	if pending != "" {
		data[s.cfg.Key+pendingSuffix] = pending
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
