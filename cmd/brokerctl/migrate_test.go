package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/etcd"
)

// bboltWithLeases writes a bbolt store of n leases (every third one
// revoked) and an intent, and closes it; it returns the file's path.
func bboltWithLeases(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "leases.db")
	s, err := store.Open(path, store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := t.Context()
	now := time.Now().UTC()
	for i := range n {
		l := broker.Lease{ID: fmt.Sprintf("l%04d", i), Role: "read_only", Client: "svc", Target: "main",
			Username: fmt.Sprintf("cb_%04d", i), ProxyRole: "read_only_role", IssueTime: now,
			ExpireTime: now.Add(time.Hour), MaxExpireTime: now.Add(time.Hour), State: broker.StateActive}
		if err := s.CreateLease(ctx, &l); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			l.State, l.EndTime = broker.StateRevoked, now
			if _, err := s.UpdateLease(ctx, l); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := s.PutIntent(ctx, broker.Intent{LeaseID: "pending", Target: "main", Username: "cb_pending", CreateTime: now}); err != nil {
		t.Fatal(err)
	}
	return path
}

func runCtl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestMigrate(t *testing.T) {
	path := bboltWithLeases(t, 200)
	cluster := etcdtest.StartCluster(t, 1)
	eps := strings.Join(cluster.Endpoints(), ",")
	prefix := "/credbroker-migrate-test/"
	countKeys := func() etcd.KeyCounts {
		t.Helper()
		s, err := etcd.Open(t.Context(), etcd.Options{Endpoints: cluster.Endpoints(), Prefix: prefix, DialTimeout: 20 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		c, err := s.CountKeys(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	t.Run("refused while a broker holds the file", func(t *testing.T) {
		held, err := store.Open(path, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer held.Close()
		start := time.Now()
		code, _, stderr := runCtl(t, "migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--prefix", prefix, "--lock-timeout", "300ms")
		if code != 1 || !strings.Contains(stderr, path+" is in use") || !strings.Contains(stderr, "stop the brokerd") {
			t.Fatalf("exit %d, stderr %q: want 1 and the busy file named", code, stderr)
		}
		if d := time.Since(start); d > 20*time.Second {
			t.Errorf("refusal took %v with --lock-timeout 300ms", d)
		}
		if c := countKeys(); c.All != 0 {
			t.Fatalf("a refused migrate wrote %d keys", c.All)
		}
	})

	t.Run("a missing file is not created", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "typo.db")
		code, _, stderr := runCtl(t, "migrate", "--from-bbolt", missing, "--etcd-endpoints", eps, "--prefix", prefix)
		if code != 1 || !strings.Contains(stderr, "no such file") {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
		if _, err := os.Stat(missing); !os.IsNotExist(err) {
			t.Fatalf("migrate created %s: %v", missing, err)
		}
	})

	t.Run("copies", func(t *testing.T) {
		code, stdout, stderr := runCtl(t, "--json", "migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--prefix", prefix)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		var rep struct {
			Leases, Live, Ended, Intents, WrittenLeases int
			Verified                                    bool
		}
		if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
			t.Fatalf("%v: %s", err, stdout)
		}
		if rep.Leases != 200 || rep.Live != 133 || rep.Ended != 67 || rep.Intents != 1 || rep.WrittenLeases != 200 || !rep.Verified {
			t.Fatalf("report %+v", rep)
		}
		c := countKeys()
		if c.Leases != 200 || c.Expiry != 133 || c.Tombstones != 67 || c.Intents != 1 || c.LastIssued != 1 || c.Group != 1 {
			t.Fatalf("etcd keys after migrate: %+v", c)
		}
	})

	t.Run("refuses the now used prefix", func(t *testing.T) {
		code, _, stderr := runCtl(t, "migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--prefix", prefix)
		if code != 1 || !strings.Contains(stderr, "etcd prefix "+prefix) || !strings.Contains(stderr, "not empty") {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
	})

	t.Run("resume of a finished copy", func(t *testing.T) {
		code, stdout, stderr := runCtl(t, "migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--prefix", prefix, "--resume")
		if code != 0 || !strings.Contains(stdout, "0 leases, 0 intents") {
			t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
	})

	t.Run("the etcd side from a brokerd configuration", func(t *testing.T) {
		dir := t.TempDir()
		cfg := filepath.Join(dir, "brokerd.yaml")
		yml := fmt.Sprintf(`store:
  etcd:
    endpoints: [%s]
    prefix: /credbroker-from-config/
targets:
  - {name: main, url: "postgres://broker_admin@127.0.0.1:5432/app", password_file: admin.password}
roles:
  - {name: read_only, target: main, proxy_role: read_only_role, default_ttl: 15m, max_ttl: 1h}
`, eps)
		if err := os.WriteFile(cfg, []byte(yml), 0o600); err != nil {
			t.Fatal(err)
		}
		code, stdout, stderr := runCtl(t, "migrate", "--from-bbolt", path, "--config", cfg)
		if code != 0 || !strings.Contains(stdout, "/credbroker-from-config/") || !strings.Contains(stdout, "200 (133 live, 67 ended)") {
			t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
		if code, _, stderr := runCtl(t, "migrate", "--from-bbolt", path, "--config", cfg, "--prefix", "/x/"); code != 2 {
			t.Errorf("--config with --prefix: exit %d (%s), want 2", code, stderr)
		}
	})

	// Last: it turns etcd authentication on for the cluster.
	defer t.Run("etcd authentication", func(t *testing.T) {
		ctx := t.Context()
		cli, err := clientv3.New(clientv3.Config{Endpoints: cluster.Endpoints(), DialTimeout: 20 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		const authPrefix = "/credbroker-auth/"
		password := "pw-" + strings.Repeat("s3cr3t", 4)
		for _, step := range []func() error{
			func() error { _, err := cli.UserAdd(ctx, "root", "root-"+password); return err },
			func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
			func() error { _, err := cli.RoleAdd(ctx, "credbroker"); return err },
			func() error {
				_, err := cli.RoleGrantPermission(ctx, "credbroker", authPrefix, clientv3.GetPrefixRangeEnd(authPrefix), clientv3.PermissionType(clientv3.PermReadWrite))
				return err
			},
			func() error { _, err := cli.UserAdd(ctx, "credbroker", password); return err },
			func() error { _, err := cli.UserGrantRole(ctx, "credbroker", "credbroker"); return err },
			func() error { _, err := cli.AuthEnable(ctx); return err },
		} {
			if err := step(); err != nil {
				t.Fatal(err)
			}
		}
		dir := t.TempDir()
		good, bad := filepath.Join(dir, "etcd.password"), filepath.Join(dir, "wrong.password")
		if err := os.WriteFile(good, []byte(password+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bad, []byte("wrong-"+password+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		args := []string{"migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--prefix", authPrefix, "--etcd-username", "credbroker"}
		code, stdout, stderr := runCtl(t, append(args, "--etcd-password-file", bad)...)
		if code != 1 || strings.Contains(stdout+stderr, password) {
			t.Fatalf("wrong password: exit %d, output shows the password or succeeded:\n%s%s", code, stdout, stderr)
		}
		code, stdout, stderr = runCtl(t, append(args, "--etcd-password-file", good)...)
		if code != 0 || !strings.Contains(stdout, "200 (133 live, 67 ended)") || strings.Contains(stdout+stderr, password) {
			t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
		// Outside its prefix the user may not write: the copy needed
		// nothing more than the prefix.
		code, _, stderr = runCtl(t, "migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--prefix", "/elsewhere/",
			"--etcd-username", "credbroker", "--etcd-password-file", good)
		if code != 1 || !strings.Contains(stderr, "permission denied") {
			t.Fatalf("outside the granted prefix: exit %d, stderr %q", code, stderr)
		}
	})

	t.Run("usage", func(t *testing.T) {
		for _, args := range [][]string{
			{"migrate", "--etcd-endpoints", eps},
			{"migrate", "--from-bbolt", path},
			{"migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--prefix", "/no-slash"},
			{"migrate", "--from-bbolt", path, "--etcd-endpoints", eps, "--etcd-cert-file", "c.pem"},
		} {
			if code, _, stderr := runCtl(t, args...); code != 2 {
				t.Errorf("%v: exit %d (%s), want 2", args, code, stderr)
			}
		}
	})
}
