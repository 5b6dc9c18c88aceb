package vaultkv

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/vaultkv/kvtest"
)

// The credentials scrub removes from errors are the current ones and a
// few before them, not every batch token brokerd ever had: the list stays
// bounded however long brokerd runs.
func TestScrubRemembersBoundedSecrets(t *testing.T) {
	ctx := context.Background()
	s := kvtest.NewServer(t, kvtest.Options{TokenTTL: time.Hour, Batch: true})
	c, err := New(ctx, Config{Address: s.URL, Mount: s.Mount, Path: "x", Auth: AuthAppRole, RoleID: s.RoleID, SecretID: s.SecretID})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3*rememberedSecrets; i++ {
		c.authMu.Lock()
		err := c.login(ctx)
		c.authMu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	}
	c.mu.Lock()
	n := len(c.secrets)
	c.mu.Unlock()
	if n > rememberedSecrets {
		t.Errorf("scrub remembers %d credentials after %d logins, want at most %d", n, 3*rememberedSecrets+1, rememberedSecrets)
	}
	tok := c.vc.Token()
	if got := c.scrub(errors.New("bad token " + tok)).Error(); strings.Contains(got, tok) {
		t.Errorf("scrub left the current token in %q", got)
	}
}
