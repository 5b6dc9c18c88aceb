package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/server/config"
)

// serveConfig builds the broker of a configuration file as brokerd does,
// root-credential rotation included, and serves it on loopback.
func serveConfig(t *testing.T, cfgPath string) string {
	t.Helper()
	f, err := config.Load(cfgPath)
	return serveConfigFile(t, f, err, nil)
}

func TestRotateRoot(t *testing.T) {
	t.Parallel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfgPath, _ := checkConfig(t, tg, "")
	b := &testBroker{addr: serveConfig(t, cfgPath), target: tg}
	pwFile := filepath.Join(filepath.Dir(cfgPath), "admin.password")

	out := fields(b.ok(t, "rotate-root", "main"))
	if out["target"] != "main" || out["stored_in"] != "file "+pwFile || out["rotated"] == "" {
		t.Fatalf("rotate-root printed %q", out)
	}
	raw, err := os.ReadFile(pwFile)
	if err != nil {
		t.Fatal(err)
	}
	next := strings.TrimSpace(string(raw))
	if next == tg.AdminPassword || strings.Contains(out["stored_in"]+out["rotated"], next) {
		t.Fatal("the password file was not changed, or the new password was printed")
	}
	conn, err := pgx.Connect(context.Background(), tg.URL(tg.AdminUser, next))
	if err != nil {
		t.Fatalf("the admin cannot log in with the stored password: %v", err)
	}
	conn.Close(context.Background())
	// The broker still issues credentials.
	if got := fields(b.ok(t, "issue", "read_only")); got["username"] == "" {
		t.Errorf("issue after rotate-root printed %q", got)
	}

	r := ctl(t, "--addr", b.addr, "rotate-root", "nope")
	if r.code != 1 || !strings.Contains(r.stderr, "error: NotFound: unknown target") {
		t.Errorf("rotate-root of an unknown target: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := ctl(t, "--addr", b.addr, "rotate-root"); r.code != 2 {
		t.Errorf("rotate-root without a target: exit %d", r.code)
	}
}
