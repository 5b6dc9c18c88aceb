package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credbroker/credbroker/internal/etcdtest"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
)

// TestStatusOnBbolt: the group of a bbolt store is the one brokerd, which
// leads since it started.
func TestStatusOnBbolt(t *testing.T) {
	t.Parallel()
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	cfgPath, _ := checkConfig(t, tg, "instance: solo")
	b := &testBroker{addr: serveConfig(t, cfgPath), target: tg}
	out := b.ok(t, "status")
	head, table, _ := strings.Cut(out, "\n\n")
	f := fields(head)
	if f["store"] != "bbolt" || !strings.HasPrefix(f["leader"], "solo since ") || f["answered_by"] != "solo" {
		t.Fatalf("status printed %q", head)
	}
	rows := tableRows(table)
	if len(rows) != 2 || rows[1][0] != "solo" || rows[1][1] != b.addr || rows[1][4] != "leader" {
		t.Fatalf("instances: %q", rows)
	}
}

// TestStatusOnEtcd: two brokerd sharing an etcd prefix; status, asked of
// either, lists both and names the leader; once the leader stops, the
// other is listed alone, leading.
func TestStatusOnEtcd(t *testing.T) {
	t.Parallel()
	cluster := etcdtest.StartCluster(t, 1)
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	start := func(name string) (string, *daemon.Daemon, func()) {
		dir := t.TempDir()
		pw := filepath.Join(dir, "admin.password")
		if err := os.WriteFile(pw, []byte(tg.AdminPassword), 0o600); err != nil {
			t.Fatal(err)
		}
		yml := fmt.Sprintf(`instance: %s
store:
  etcd: {endpoints: [%s], prefix: /status/, session_ttl: 2s}
targets:
  - {name: main, url: %q, password_file: %q, marker_role: %s}
roles:
  - {name: read_only, target: main, proxy_role: %s, default_ttl: 15m, max_ttl: 1h}
`, name, cluster.Endpoints()[0], tg.AdminURL, pw, tg.MarkerRole, tg.ProxyRoles["read_only"])
		f, err := config.Parse([]byte(yml))
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := f.Validate()
		if err != nil {
			t.Fatal(err)
		}
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		d, err := daemon.Start(context.Background(), cfg, daemon.Options{Listener: lis, SkipPrivilegeCheck: true})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- d.Serve(ctx) }()
		var once sync.Once
		stop := func() {
			once.Do(func() {
				cancel()
				<-served
				d.Close()
			})
		}
		t.Cleanup(stop)
		<-d.Ready()
		return lis.Addr().String(), d, stop
	}
	addrA, _, stopA := start("broker-a")
	addrB, _, _ := start("broker-b")

	type statusDoc struct {
		Store       string `json:"store"`
		Leader      string `json:"leader"`
		LeaderSince string `json:"leaderSince"`
		AnsweredBy  string `json:"answeredBy"`
		Instances   []struct {
			Name    string `json:"name"`
			Address string `json:"address"`
			Leader  bool   `json:"leader"`
		} `json:"instances"`
	}
	status := func(addr string) statusDoc {
		t.Helper()
		r := ctl(t, "--addr", addr, "--json", "status")
		if r.code != 0 {
			t.Fatalf("status: exit %d: %s", r.code, r.stderr)
		}
		var doc statusDoc
		if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil {
			t.Fatal(err)
		}
		return doc
	}
	// A started first, so it leads once it has campaigned.
	deadline := time.Now().Add(30 * time.Second)
	var doc statusDoc
	for doc = status(addrB); (doc.Leader == "" || doc.LeaderSince == "") && time.Now().Before(deadline); doc = status(addrB) {
		time.Sleep(50 * time.Millisecond)
	}
	if doc.Store != "etcd" || doc.Leader != "broker-a" || doc.AnsweredBy != "broker-b" || len(doc.Instances) != 2 {
		t.Fatalf("status from B: %+v", doc)
	}
	if doc.Instances[0].Name != "broker-a" || doc.Instances[0].Address != addrA || !doc.Instances[0].Leader || doc.Instances[1].Leader {
		t.Fatalf("instances: %+v", doc.Instances)
	}
	if got := status(addrA); got.Leader != "broker-a" || got.AnsweredBy != "broker-a" {
		t.Fatalf("status from A: %+v", got)
	}

	stopA() // resigns and leaves: B is elected at once
	deadline = time.Now().Add(30 * time.Second)
	for doc = status(addrB); (doc.Leader != "broker-b" || doc.LeaderSince == "") && time.Now().Before(deadline); doc = status(addrB) {
		time.Sleep(50 * time.Millisecond)
	}
	if doc.Leader != "broker-b" || len(doc.Instances) != 1 || !doc.Instances[0].Leader {
		t.Fatalf("status after A stopped: %+v", doc)
	}
	r := ctl(t, "--addr", addrB, "status")
	if !strings.Contains(r.stdout, "broker-b since ") || !strings.Contains(r.stdout, "leader") {
		t.Errorf("text status: %s", r.stdout)
	}
}
