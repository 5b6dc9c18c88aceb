package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/syncbuf"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/store/etcd"
)

// etcdConfig writes a configuration of one instance of a broker group on
// etcd: like targetConfig, with store.etcd (endpoints, prefix, the
// session_ttl given) instead of store.path; etcdExtra is indented under
// store.etcd, extra appended at the top level.
func etcdConfig(t *testing.T, tg *pgtest.Target, endpoints []string, prefix, instance string, ttl time.Duration, etcdExtra, extra string) *config.Config {
	t.Helper()
	dir := t.TempDir()
	pw := filepath.Join(dir, "admin.password")
	if err := os.WriteFile(pw, []byte(tg.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "listen: 127.0.0.1:0\ninstance: %s\nstore:\n  etcd:\n    endpoints: [%s]\n    prefix: %q\n    session_ttl: %s\n    dial_timeout: 10s\n%s",
		instance, strings.Join(endpoints, ", "), prefix, ttl, etcdExtra)
	fmt.Fprintf(&b, "targets:\n  - name: main\n    url: %q\n    password_file: %q\n    marker_role: %s\n    connect_timeout: 5s\n",
		tg.AdminURL, pw, tg.MarkerRole)
	fmt.Fprintf(&b, "roles:\n  - {name: read_only, target: main, proxy_role: %s, default_ttl: 1m, max_ttl: 5m}\n", tg.ProxyRoles["read_only"])
	b.WriteString(extra)
	return parseConfig(t, b.String())
}

// TestStartOnEtcd: store.etcd opens the etcd store (not a bbolt file):
// a lease issued through the daemon is a key under the group's prefix,
// and etcd's authentication works with the password read from
// store.etcd.password_file, which appears in no log line.
func TestStartOnEtcd(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 1)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	const etcdPassword = "etcd-Secret-pw-42"
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	enableEtcdAuth(ctx, t, cluster.Endpoints(), "credbroker", etcdPassword)

	pwFile := filepath.Join(t.TempDir(), "etcd.password")
	if err := os.WriteFile(pwFile, []byte(etcdPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	auth := fmt.Sprintf("    username: credbroker\n    password_file: %q\n", pwFile)
	var logs syncbuf.Buffer
	opts := testOptions()
	opts.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := etcdConfig(t, tg, cluster.Endpoints(), "/group-a/", "broker-a", 2*time.Second, auth, "")
	d, err := Start(ctx, cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, ok := d.Store().(*etcd.Store); !ok {
		t.Fatalf("store is %T, want *etcd.Store", d.Store())
	}
	lease, _, err := d.Broker().Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "test"})
	if err != nil {
		t.Fatal(err)
	}
	cli := etcdClient(t, cluster.Endpoints(), "credbroker", etcdPassword)
	resp, err := cli.Get(ctx, "/group-a/lease/"+lease.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("lease %s is not under /group-a/ in etcd", lease.ID)
	}
	if strings.Contains(logs.String(), etcdPassword) {
		t.Fatalf("the etcd password is in the log:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "backend=etcd") {
		t.Errorf("the store's backend is not logged:\n%s", logs.String())
	}

	// A wrong password fails Start, naming the key, not the password.
	if err := os.WriteFile(pwFile, []byte("wrong-"+etcdPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg2 := etcdConfig(t, tg, cluster.Endpoints(), "/group-a/", "broker-b", 2*time.Second, auth, "")
	d2, err := Start(ctx, cfg2, testOptions())
	if err == nil {
		d2.Close()
		t.Fatal("Start succeeded with a wrong etcd password")
	}
	if !strings.HasPrefix(err.Error(), "store.etcd: ") || strings.Contains(err.Error(), etcdPassword) {
		t.Fatalf("error = %v", err)
	}
}

// enableEtcdAuth turns on etcd's authentication with a root user and a
// user of the given name and password, allowed everything.
func enableEtcdAuth(ctx context.Context, t *testing.T, endpoints []string, user, password string) {
	t.Helper()
	cli := etcdClient(t, endpoints, "", "")
	steps := []func() error{
		func() error { _, err := cli.RoleAdd(ctx, "root"); return err },
		func() error { _, err := cli.UserAdd(ctx, "root", "root-pw"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.UserAdd(ctx, user, password); return err },
		func() error { _, err := cli.UserGrantRole(ctx, user, "root"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("enabling etcd auth, step %d: %v", i, err)
		}
	}
}

func etcdClient(t *testing.T, endpoints []string, user, password string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 10 * time.Second, Username: user, Password: password, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}
