package config

import (
	"net"

	"github.com/credbroker/credbroker/server/vaultapi"
)

// VaultAPIFile is the vault_api section.
type VaultAPIFile struct {
	// Listen is the HTTP address of the Vault-compatible API; absent,
	// brokerd serves none.
	Listen string `yaml:"listen"`
	// Mount is the path the database engine appears at (/v1/<mount>/creds/<role>).
	Mount string `yaml:"mount"`
}

// VaultAPI configures the Vault-compatible HTTP API.
type VaultAPI struct {
	// Listen is host:port, or "" for none. Without tls it must be on
	// loopback, as gRPC's; with tls it serves HTTPS with the same
	// certificate and client CA, and may bind anywhere.
	Listen string
	// Mount is where the database engine appears; vaultapi.DefaultMount
	// when not set.
	Mount string
}

// vaultAPI validates the vault_api section. Off by default, as metrics:
// a second API that hands out passwords is the operator's choice.
func (v *validator) vaultAPI(f *File) VaultAPI {
	a := VaultAPI{Listen: f.VaultAPI.Listen, Mount: f.VaultAPI.Mount}
	if a.Mount == "" {
		a.Mount = vaultapi.DefaultMount
	}
	if err := vaultapi.ValidateMount(a.Mount); err != nil {
		v.errorf("vault_api.mount", "%v", err)
	}
	if a.Listen == "" {
		return a
	}
	network, _, err := ParseListenTLS(a.Listen, f.TLS != nil)
	switch {
	case err != nil:
		v.errorf("vault_api.listen", "%v", err)
	case network != "tcp":
		v.errorf("vault_api.listen", "%q: want host:port, not a unix socket (VAULT_ADDR is an http(s) URL)", a.Listen)
	}
	grpcListen := f.Listen
	if grpcListen == "" {
		grpcListen = DefaultListen
	}
	if _, port, _ := net.SplitHostPort(a.Listen); port != "0" {
		for key, other := range map[string]string{"listen": grpcListen, "metrics.listen": f.Metrics.Listen} {
			if a.Listen == other {
				v.errorf("vault_api.listen", "%q is also %s; give each its own port", a.Listen, key)
			}
		}
	}
	return a
}
