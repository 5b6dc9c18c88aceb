package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server/daemon"
)

// The start-up check logs the least-privilege findings of brokerd's
// targets (daemon.Start runs it beside serving).
func TestStartupPrivilegeWarnings(t *testing.T) {
	c := writeConfig(t, "127.0.0.1:0", "")
	ctx := context.Background()
	super, err := pgx.Connect(ctx, c.target.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer super.Close(ctx)
	proxy := postgres.QuoteIdentifier(c.target.ProxyRoles["read_only"])
	if _, err := super.Exec(ctx, "GRANT INSERT ON demo TO "+proxy); err != nil {
		t.Fatal(err)
	}

	cfg, err := loadConfig(c.path)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	d, err := daemon.Start(ctx, cfg, daemon.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	// The check runs beside serving: wait for its findings.
	want := `level=WARN msg="least privilege: read-only role may INSERT on table demo" severity=high check=read-only-writes target=main`
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(logs.String(), want) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	out := logs.String()
	if !strings.Contains(out, want) {
		t.Errorf("log lacks %q:\n%s", want, out)
	}
	if strings.Contains(out, "least-privilege check incomplete") {
		t.Errorf("the check did not complete:\n%s", out)
	}
	if strings.Contains(out, c.target.AdminPassword) {
		t.Error("the admin password was logged")
	}
}
