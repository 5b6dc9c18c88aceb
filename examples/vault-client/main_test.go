package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/credbroker/credbroker/internal/brokertest"
	"github.com/credbroker/credbroker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestRun runs the example as the walk-through of `brokerd dev` does,
// against a broker with the Vault API and real PostgreSQL.
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := brokertest.Start(t, brokertest.Options{VaultAPI: true})
	t.Setenv("VAULT_ADDR", b.VaultAddr())
	t.Setenv("VAULT_TOKEN", "any-token-in-local-mode")
	client, err := vault.NewClient(vault.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := run(ctx, client, "read_only", &out); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	t.Logf("\n%s", out.String())
	for _, want := range []string{"lease_id        database/creds/read_only/", "lease_duration  600s (renewable: true)",
		"logged in       as ", ", acting as " + b.Target.ProxyRoles["read_only"], "renewed         lease_duration 35" /* 1h max TTL, capped */, "revoked"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if b.Broker() == nil {
		t.Fatal("broker stopped")
	}
	username := out.String()[strings.Index(out.String(), "username")+len("username        "):]
	username = strings.TrimSpace(username[:strings.IndexByte(username, '\n')])
	if exists, err := b.RoleExists(ctx, username); err != nil || exists {
		t.Errorf("user %s exists=%v (%v) after the example revoked it", username, exists, err)
	}
}
