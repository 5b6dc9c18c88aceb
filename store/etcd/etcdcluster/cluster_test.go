package etcdcluster_test

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// TestClusterLifecycle starts three members, loses one and keeps writing,
// brings it back, and checks that Stop leaves no process and no directory.
func TestClusterLifecycle(t *testing.T) {
	if _, err := etcdcluster.FindBinary(); err != nil {
		t.Skip(err)
	}
	c, err := etcdcluster.Start(t.Context(), etcdcluster.Options{NoFsync: true, StartTimeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop() })
	if len(c.Members) != 3 || len(c.Endpoints()) != 3 {
		t.Fatalf("members %d, endpoints %v", len(c.Members), c.Endpoints())
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	// A write retried until a deadline: losing the raft leader fails
	// the proposals in flight until a new one is elected.
	put := func(v string) error {
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		for {
			attempt, stop := context.WithTimeout(ctx, 10*time.Second)
			_, err := cli.Put(attempt, "k", v)
			stop()
			if err == nil || ctx.Err() != nil {
				return err
			}
		}
	}
	if err := put("1"); err != nil {
		t.Fatal(err)
	}
	first := c.Members[0]
	pid := first.Pid()
	first.Kill()
	if first.Pid() != 0 || syscall.Kill(pid, 0) == nil {
		t.Fatalf("member %s (pid %d) still running after Kill", first.Name, pid)
	}
	if err := put("2"); err != nil {
		t.Fatalf("write with one member of three down: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if err := first.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	pids := []int{}
	for _, m := range c.Members {
		pids = append(pids, m.Pid())
	}
	dir := c.Dir
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, p := range pids {
		if p == 0 || syscall.Kill(p, 0) == nil {
			t.Fatalf("pid %d: not started, or still running after Stop", p)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Stop left %s: %v", dir, err)
	}
}
