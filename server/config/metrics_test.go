package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMetricsListen(t *testing.T) {
	tests := []struct {
		name, section, want, err string
	}{
		{name: "absent is off"},
		{name: "loopback", section: "metrics: {listen: 127.0.0.1:9450}", want: "127.0.0.1:9450"},
		{name: "routable without tls", section: "metrics: {listen: 0.0.0.0:9450}", err: "metrics.listen: listen 0.0.0.0:9450: plaintext"},
		{name: "routable with tls", section: "metrics: {listen: 0.0.0.0:9450}\ntls: {cert_file: DIR/c.pem, key_file: DIR/k.pem, client_ca_file: DIR/ca.pem}", want: "0.0.0.0:9450"},
		{name: "unix socket", section: "metrics: {listen: unix:/run/m.sock}", err: "metrics.listen: \"unix:/run/m.sock\": want host:port"},
		{name: "not an address", section: "metrics: {listen: nine}", err: "metrics.listen: listen nine: want host:port"},
		{name: "unknown key", section: "metrics: {lsiten: 127.0.0.1:9450}", err: `metrics.lsiten: unknown key (line 20); did you mean "listen"?`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Validate checks that the TLS files exist; it does not read them.
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
			if c.Metrics.Listen != tc.want {
				t.Fatalf("Metrics.Listen = %q, want %q", c.Metrics.Listen, tc.want)
			}
		})
	}
}
