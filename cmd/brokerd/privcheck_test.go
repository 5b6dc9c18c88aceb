package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server/config"
)

// The start-up check logs the least-privilege findings of brokerd's
// targets (runServer runs it beside serving).
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
	rt, err := config.Build(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	logPrivilegeFindings(ctx, rt, log)

	out := logs.String()
	want := `level=WARN msg="least privilege: read-only role may INSERT on table demo" severity=high check=read-only-writes target=main`
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
