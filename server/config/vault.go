package config

import (
	"fmt"
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
	Auth string
	// TokenFile or TokenEnv holds the token (auth: token); SecretIDFile
	// or SecretIDEnv the secret id (auth: approle). Package rootcred
	// reads them.
	TokenFile, TokenEnv       string
	AppRoleMount              string
	RoleID                    string
	SecretIDFile, SecretIDEnv string
	CACert                    string
	// RefreshInterval: how often the secret is re-read for changes.
	RefreshInterval time.Duration
}

// Defaults of targets[].vault.
const (
	DefaultVaultMount      = "secret"
	DefaultVaultKey        = "password"
	DefaultRefreshInterval = time.Minute
)

// PendingSuffix names the field (Vault) or file (password_file) holding a
// rotation's new password until it is known to be the server's (package
// rootcred); a key of that name would clash with it.
const PendingSuffix = "_pending"

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
	if strings.HasSuffix(out.Key, PendingSuffix) {
		v.errorf(p+".key", "%q ends in %s, which credbroker uses for a rotation in progress", out.Key, PendingSuffix)
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
		out.TokenFile, out.TokenEnv = v.credential(p, f, "token", vf.TokenFile, vf.TokenEnv)
	case vaultkv.AuthAppRole:
		if out.RoleID == "" {
			v.errorf(p+".role_id", "required for auth: approle")
		}
		out.SecretIDFile, out.SecretIDEnv = v.credential(p, f, "secret_id", vf.SecretIDFile, vf.SecretIDEnv)
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

// credential checks that a Vault credential comes from exactly one of
// <name>_file or <name>_env, and returns them (the file made absolute).
func (v *validator) credential(p string, f *File, name, file, env string) (string, string) {
	switch {
	case file != "" && env != "":
		v.errorf(p, "set %s_file or %s_env, not both", name, name)
	case file != "":
		return f.path(file), ""
	case env != "":
		v.passwordEnvName(p+"."+name+"_env", env)
		return "", env
	default:
		v.errorf(p, "auth needs %s_file or %s_env", name, name)
	}
	return "", ""
}

func (vt *Vault) String() string {
	return fmt.Sprintf("vault %s %s/%s#%s", vt.Address, vt.Mount, vt.Path, vt.Key)
}
