package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker/postgres"
)

// brokerd logs the least-privilege findings of its targets at start-up,
// and still serves.
func TestStartupPrivilegeWarnings(t *testing.T) {
	sock := filepath.Join(shortTempDir(t), "cb.sock")
	c := writeConfig(t, "unix:"+sock, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	super, err := pgx.Connect(ctx, c.target.SuperURL)
	if err != nil {
		t.Fatal(err)
	}
	defer super.Close(context.Background())
	proxy := postgres.QuoteIdentifier(c.target.ProxyRoles["read_only"])
	if _, err := super.Exec(ctx, "GRANT INSERT ON "+"demo TO "+proxy); err != nil {
		t.Fatal(err)
	}

	var stdout, stderr syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"--config", c.path}, &stdout, &stderr) }()
	conn := dial(t, "unix:"+sock)
	waitServing(t, conn)
	cancel()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("brokerd did not stop")
	}
	logs := stderr.String()
	want := `level=WARN msg="least privilege: read-only role may INSERT on table demo" severity=high check=read-only-writes target=main`
	if !strings.Contains(logs, want) {
		t.Errorf("log lacks %q:\n%s", want, logs)
	}
	if strings.Contains(logs, c.target.AdminPassword) {
		t.Error("the admin password was logged")
	}
}
