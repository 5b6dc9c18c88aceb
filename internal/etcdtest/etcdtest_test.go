package etcdtest

import (
	"context"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

func newClient(t *testing.T, endpoints []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

func TestServer(t *testing.T) {
	eps := Server(t)
	if again := Server(t); len(again) != len(eps) || again[0] != eps[0] {
		t.Errorf("second Server call = %v, want the same server %v", again, eps)
	}
	prefix := Prefix(t, eps)
	cli := newClient(t, eps)
	if _, err := cli.Put(t.Context(), prefix+"k", "v"); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(t.Context(), prefix+"k")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
		t.Fatalf("Get = %v, %v", resp, err)
	}
}

// A three-member cluster keeps serving with one member down, and the
// member rejoins after a restart.
func TestCluster(t *testing.T) {
	if os.Getenv(EndpointsEnv) != "" {
		t.Skipf("$%s is set: no local clusters", EndpointsEnv)
	}
	c := StartCluster(t, 3)
	cli := newClient(t, c.Endpoints())
	// A write may fail while the survivors elect a new leader (the killed
	// member may have led; "request timed out" under load): the cluster
	// keeps serving if a write succeeds within the deadline.
	put := func(key string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			_, err := cli.Put(ctx, key, "v")
			cancel()
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("Put(%s): %v", key, err)
			}
			time.Sleep(100 * time.Millisecond) // a retry's pace, not a wait for an event
		}
	}
	put("before")
	c.Members[0].Kill()
	put("during")
	c.Members[0].Restart(t)
	// The restarted member alone serves a linearizable read of the write
	// made while it was down.
	one := newClient(t, []string{c.Members[0].ClientURL})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	resp, err := one.Get(ctx, "during")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("Get from the restarted member = %v, %v", resp, err)
	}
}
