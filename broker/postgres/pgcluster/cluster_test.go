package pgcluster_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker/postgres/pgcluster"
)

func TestClusterLifecycle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	c, err := pgcluster.Start(ctx, pgcluster.Options{
		LogStatements: true,
		ExtraConf:     map[string]string{"application_name": "pgcluster_test"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop() })

	if c.Host != "127.0.0.1" || c.Port == 0 || c.Superuser != "postgres" || c.Version < 13 {
		t.Fatalf("unexpected cluster fields: %+v", c)
	}
	if !strings.HasPrefix(filepath.Base(filepath.Dir(c.DataDir)), pgcluster.TempPrefix) {
		t.Errorf("data dir %s is not under a %s* directory", c.DataDir, pgcluster.TempPrefix)
	}

	conn, err := pgx.Connect(ctx, c.SuperuserURL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	var version int
	var app string
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int / 10000, current_setting('application_name')").Scan(&version, &app); err != nil {
		t.Fatal(err)
	}
	if version != c.Version {
		t.Errorf("server says major %d, cluster says %d", version, c.Version)
	}
	if app != "pgcluster_test" {
		t.Errorf("ExtraConf not applied: application_name = %q", app)
	}

	// A non-superuser must present its password over TCP.
	if _, err := conn.Exec(ctx, "CREATE ROLE alice LOGIN PASSWORD 'right-password'"); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close(ctx)
	tests := []struct {
		name, password string
		wantOK         bool
	}{
		{"no password", "", false},
		{"wrong password", "wrong-password", false},
		{"right password", "right-password", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := pgx.Connect(ctx, c.URL("alice", tt.password, "postgres"))
			if tt.wantOK != (err == nil) {
				t.Fatalf("login: err = %v, want success %v", err, tt.wantOK)
			}
			if conn != nil {
				_ = conn.Close(ctx)
			}
		})
	}

	log, err := c.Log()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "server_version_num") {
		t.Errorf("LogStatements: the log does not show the statement we ran:\n%s", log)
	}

	dir := filepath.Dir(c.DataDir)
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := c.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("Stop left %s behind (stat: %v)", dir, err)
	}
	if _, err := pgx.Connect(ctx, c.SuperuserURL("postgres")); err == nil {
		t.Error("server still accepts connections after Stop")
	}
}

func TestRemoveStale(t *testing.T) {
	// A directory whose creator and postmaster are gone is removed; one
	// whose creator lives (us) is kept.
	dead := mkdirStale(t, 1<<22+12345) // above pid_max's default: no such process
	alive := mkdirStale(t, os.Getpid())
	pgcluster.RemoveStale()
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("stale dir %s was not removed", dead)
	}
	if _, err := os.Stat(alive); err != nil {
		t.Errorf("live dir %s was removed: %v", alive, err)
	}
}

func mkdirStale(t *testing.T, ownerPid int) string {
	t.Helper()
	d, err := os.MkdirTemp("", pgcluster.TempPrefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	if err := os.WriteFile(filepath.Join(d, "credbroker-owner.pid"), []byte(strconv.Itoa(ownerPid)), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestFindBinDir(t *testing.T) {
	t.Run("env must hold binaries", func(t *testing.T) {
		t.Setenv("CREDBROKER_PG_BINDIR", t.TempDir())
		if _, err := pgcluster.FindBinDir(); err == nil {
			t.Fatal("FindBinDir accepted a CREDBROKER_PG_BINDIR without initdb")
		}
	})
	t.Run("found", func(t *testing.T) {
		t.Setenv("CREDBROKER_PG_BINDIR", "")
		d, err := pgcluster.FindBinDir()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(d, "initdb")); err != nil {
			t.Fatalf("FindBinDir = %s, which has no initdb", d)
		}
	})
}
