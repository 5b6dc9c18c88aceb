package vaultapi_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// NodeVaultVersion is the node-vault `make node-vault` installs.
const NodeVaultVersion = "0.12.0"

// nodeVaultModules finds node-vault's node_modules: CREDBROKER_NODE_VAULT_DIR
// (what make test sets), else where `make node-vault` puts it.
func nodeVaultModules() string {
	dirs := []string{os.Getenv("CREDBROKER_NODE_VAULT_DIR"),
		"/var/cache/credbroker/node-vault-" + NodeVaultVersion,
		filepath.Join("..", "..", ".cache", "node-vault-"+NodeVaultVersion)}
	for _, d := range dirs {
		if d == "" {
			continue
		}
		m := filepath.Join(d, "node_modules")
		if _, err := os.Stat(filepath.Join(m, "node-vault", "package.json")); err == nil {
			abs, _ := filepath.Abs(m)
			return abs
		}
	}
	return ""
}

// TestNodeVault runs a second, independent Vault client, the node-vault
// npm package, through issue, renew, LIST and revoke (local mode: every
// token is the admin local, but a revocation still drops the user).
func TestNodeVault(t *testing.T) {
	modules := nodeVaultModules()
	node, err := exec.LookPath("node")
	if modules == "" || err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("node or node-vault %s missing (node: %v; make node-vault installs node-vault)", NodeVaultVersion, err)
		}
		t.Skipf("node or node-vault %s not installed (make node-vault)", NodeVaultVersion)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := startBroker(t, localConfig)
	cmd := exec.CommandContext(ctx, node, "testdata/node-vault.js")
	cmd.Env = append(os.Environ(), "NODE_PATH="+modules, "VAULT_ADDR="+b.addr, "VAULT_TOKEN=node-vault-token")
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("node-vault: %v\n%s", err, stderr)
	}
	t.Logf("node-vault: %s", out)
	var got struct {
		LeaseID              string   `json:"lease_id"`
		LeaseDuration        int      `json:"lease_duration"`
		Renewable            bool     `json:"renewable"`
		Username             string   `json:"username"`
		HasPassword          bool     `json:"has_password"`
		RenewedLeaseDuration int      `json:"renewed_lease_duration"`
		Keys                 []string `json:"keys"`
		RenewAfterRevoke     int      `json:"renew_after_revoke"`
		WrongToken           int      `json:"wrong_token"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("node-vault printed %q: %v", out, err)
	}
	id := got.LeaseID[strings.LastIndexByte(got.LeaseID, '/')+1:]
	switch {
	case !strings.HasPrefix(got.LeaseID, "database/creds/read_only/"), got.LeaseDuration != 60, !got.Renewable, got.Username == "", !got.HasPassword:
		t.Errorf("issue: %+v", got)
	case got.RenewedLeaseDuration < 119 || got.RenewedLeaseDuration > 120:
		t.Errorf("renew: lease_duration %d, want 120", got.RenewedLeaseDuration)
	case !slices.Contains(got.Keys, id):
		t.Errorf("LIST keys %v lack %s", got.Keys, id)
	case got.RenewAfterRevoke != 400:
		t.Errorf("renew after revoke: status %d, want 400", got.RenewAfterRevoke)
	case got.WrongToken != 0:
		// Local mode: any token is the admin local, as over gRPC.
		t.Errorf("local mode refused a token: status %d", got.WrongToken)
	}
	if b.roleExists(ctx, got.Username) {
		t.Errorf("user %s exists after node-vault's revoke returned", got.Username)
	}
}
