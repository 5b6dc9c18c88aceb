package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestVaultAPI(t *testing.T) {
	tests := []struct {
		name, section, listen, mount, err string
	}{
		{name: "absent is off", mount: "database"},
		{name: "loopback", section: "vault_api: {listen: 127.0.0.1:8200}", listen: "127.0.0.1:8200", mount: "database"},
		{name: "mount", section: "vault_api: {listen: 127.0.0.1:8200, mount: prod/pg-main}", listen: "127.0.0.1:8200", mount: "prod/pg-main"},
		{name: "routable without tls", section: "vault_api: {listen: 0.0.0.0:8200}", err: "vault_api.listen: listen 0.0.0.0:8200: plaintext"},
		{name: "routable with tls", section: "vault_api: {listen: 0.0.0.0:8200}\ntls: {cert_file: DIR/c.pem, key_file: DIR/k.pem, client_ca_file: DIR/ca.pem}", listen: "0.0.0.0:8200", mount: "database"},
		{name: "unix socket", section: "vault_api: {listen: unix:/run/v.sock}", err: "vault_api.listen: \"unix:/run/v.sock\": want host:port"},
		{name: "the gRPC address", section: "vault_api: {listen: 127.0.0.1:7450}", err: "vault_api.listen: \"127.0.0.1:7450\" is also listen"},
		{name: "the metrics address", section: "metrics: {listen: 127.0.0.1:9450}\nvault_api: {listen: 127.0.0.1:9450}", err: "is also metrics.listen"},
		{name: "both on port 0", section: "metrics: {listen: 127.0.0.1:0}\nvault_api: {listen: 127.0.0.1:0}", listen: "127.0.0.1:0", mount: "database"},
		{name: "mount with a slash at the end", section: "vault_api: {mount: database/}", err: "vault_api.mount: mount \"database/\""},
		{name: "mount under sys", section: "vault_api: {mount: sys/db}", err: "vault_api.mount: mount \"sys/db\": sys/ is a path Vault reserves"},
		{name: "mount with a space", section: "vault_api: {mount: \"my db\"}", err: "vault_api.mount"},
		{name: "unknown key", section: "vault_api: {lisen: 127.0.0.1:8200}", err: `vault_api.lisen: unknown key`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, name := range []string{"c.pem", "k.pem", "ca.pem"} {
				if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			c, err := loadAndValidate(t, validYAML+strings.ReplaceAll(tc.section, "DIR", dir)+"\n")
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.VaultAPI.Listen != tc.listen || c.VaultAPI.Mount != tc.mount {
				t.Fatalf("VaultAPI = %+v, want listen %q, mount %q", c.VaultAPI, tc.listen, tc.mount)
			}
		})
	}
}
