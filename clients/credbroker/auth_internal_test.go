package credbroker

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPlaintextOnlyToLoopback(t *testing.T) {
	for addr, ok := range map[string]bool{
		"127.0.0.1:7450": true, "[::1]:7450": true, "localhost:7450": true, "unix:/run/credbroker.sock": true,
		"10.0.0.1:7450": false, "broker.example.com:7450": false, "nonsense": false,
	} {
		c, err := Dial(addr)
		if (err == nil) != ok {
			t.Errorf("Dial(%q) plaintext: err %v, want allowed=%v", addr, err, ok)
		}
		if c != nil {
			_ = c.Close()
		}
	}
}

func TestBearerTokenFileIsReadPerCall(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	b := bearerFile{path: path, secure: true}
	if _, err := b.GetRequestMetadata(context.Background()); err == nil {
		t.Fatal("a missing token file gave metadata")
	}
	for _, tok := range []string{"first-token", "second-token"} {
		if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		md, err := b.GetRequestMetadata(context.Background())
		if err != nil || md["authorization"] != "Bearer "+tok {
			t.Fatalf("metadata %v, %v; want the token %s", md, err, tok)
		}
	}
	if err := os.WriteFile(path, []byte(strings.Repeat("x", maxTokenBytes+1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := b.GetRequestMetadata(context.Background()); err == nil || strings.Contains(err.Error(), "xxxx") {
		t.Fatalf("oversized token file: %v", err)
	}
	if !b.RequireTransportSecurity() {
		t.Error("a token over TLS must require transport security")
	}
}
