// Package etcdtest gives tests a real etcd: one single-member server per
// test binary for the store's contract suite (Server, with a fresh key
// prefix per test from Prefix), and three-member clusters on loopback for
// failover tests (StartCluster). Servers run from the etcd binary that
// `make etcd` builds (tools/etcd pins its version), in t.TempDir(), and are
// killed when the test binary or the test ends, failed or not.
//
// A package that calls Server opts in from its TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(etcdtest.Main(m)) }
//
// $CREDBROKER_TEST_ETCD_ENDPOINTS (comma-separated client URLs) points
// Server at an existing cluster instead; each test then works under its
// own random prefix, which is deleted at its end.
package etcdtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Environment variables the harness reads.
const (
	// BinEnv names the etcd binary; `make test` sets it to what `make
	// etcd` built.
	BinEnv = "CREDBROKER_ETCD_BIN"
	// EndpointsEnv names the client URLs of an existing cluster to test
	// against instead of starting one.
	EndpointsEnv = "CREDBROKER_TEST_ETCD_ENDPOINTS"
)

// Version is the etcd release `make etcd` builds; Binary looks for it in
// the Makefile's cache directories.
const Version = "v3.7.3"

// startTimeout bounds how long a member may take to serve a linearizable
// read after its process starts.
const startTimeout = 30 * time.Second

// Binary returns the etcd binary to run: $CREDBROKER_ETCD_BIN, else the
// one `make etcd` leaves in its cache directory, else etcd on $PATH. When
// there is none the test fails under CI (CI=true, or make test, which sets
// $CREDBROKER_ETCD_BIN) and is skipped otherwise, saying how to get one.
func Binary(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv(BinEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("$%s: %v (run `make etcd`)", BinEnv, err)
		}
		return bin
	}
	var candidates []string
	candidates = append(candidates, filepath.Join("/var/cache/credbroker", "etcd-"+Version, "etcd"))
	if root, ok := moduleRoot(); ok {
		candidates = append(candidates, filepath.Join(root, ".cache", "etcd-"+Version, "etcd"))
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return c
		}
	}
	if p, err := exec.LookPath("etcd"); err == nil {
		return p
	}
	msg := fmt.Sprintf("no etcd binary: run `make etcd` (it builds etcd %s into a cache directory; `make test` does it), "+
		"or set $%s to an etcd binary or $%s to an existing cluster", Version, BinEnv, EndpointsEnv)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// moduleRoot is the directory of the go.mod above the working directory
// (a package's tests run in the package's directory).
func moduleRoot() (string, bool) {
	dir, err := os.Getwd()
	if err != nil {
		return "", false
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, true
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", false
		}
		dir = parent
	}
}

// Member is one etcd process.
type Member struct {
	Name      string
	ClientURL string
	PeerURL   string
	DataDir   string

	bin     string
	cluster string // the --initial-cluster value
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Cluster is a set of members started together.
type Cluster struct {
	Members []*Member
}

// Endpoints returns every member's client URL.
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.Members))
	for i, m := range c.Members {
		out[i] = m.ClientURL
	}
	return out
}

// StartCluster starts an n-member cluster on loopback ports in
// t.TempDir(), waits until every member serves linearizable reads, and
// kills it at the end of the test.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	bin := Binary(t)
	c, err := startCluster(t.Context(), bin, t.TempDir(), n)
	t.Cleanup(func() { c.kill() })
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	return c
}

// startCluster starts the members; on error it returns what it started,
// for the caller to kill.
func startCluster(ctx context.Context, bin, dir string, n int) (*Cluster, error) {
	ports, err := freePorts(2 * n)
	if err != nil {
		return &Cluster{}, err
	}
	token, err := randomHex(8)
	if err != nil {
		return &Cluster{}, err
	}
	c := &Cluster{}
	var initial []string
	for i := range n {
		m := &Member{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			PeerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
			DataDir:   filepath.Join(dir, fmt.Sprintf("m%d", i)),
			bin:       bin,
			logPath:   filepath.Join(dir, fmt.Sprintf("m%d.log", i)),
		}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		m.cluster = strings.Join(initial, ",")
		if err := m.start("new", token); err != nil {
			return c, err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	for _, m := range c.Members {
		if err := m.waitHealthy(ctx); err != nil {
			return c, err
		}
	}
	return c, nil
}

func (c *Cluster) kill() {
	for _, m := range c.Members {
		m.Kill()
	}
}

// start runs the member's process. Tests do not need durability against
// power loss, so the member does not fsync (--unsafe-no-fsync): on a
// shared machine fsync dominates every write's latency.
func (m *Member) start(state, token string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return fmt.Errorf("member %s is running", m.Name)
	}
	logFile, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child has its own descriptor
	cmd := exec.Command(m.bin,
		"--name", m.Name,
		"--data-dir", m.DataDir,
		"--listen-client-urls", m.ClientURL,
		"--advertise-client-urls", m.ClientURL,
		"--listen-peer-urls", m.PeerURL,
		"--initial-advertise-peer-urls", m.PeerURL,
		"--initial-cluster", m.cluster,
		"--initial-cluster-state", state,
		"--initial-cluster-token", "etcdtest-"+token,
		"--unsafe-no-fsync",
		"--log-level", "warn",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so a signal to the test's group (Ctrl-C)
	// does not race Main's cleanup, and Kill reaches only this process.
	// Pdeathsig kills it if the test binary dies without cleaning up (go
	// test's -timeout panics past Main); strictly it fires when the OS
	// thread that started it exits, which Go threads do not unless a
	// goroutine locked to one ends.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting etcd member %s: %w", m.Name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	m.cmd, m.done = cmd, done
	return nil
}

// waitHealthy waits until the member answers a linearizable read (so the
// cluster has a leader and this member has joined it), the process exits,
// or ctx ends.
func (m *Member) waitHealthy(ctx context.Context) error {
	m.mu.Lock()
	done := m.done
	m.mu.Unlock()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{m.ClientURL},
		DialTimeout: time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-done:
			cancel()
		case <-ctx.Done():
		}
	}()
	var last error
	for ctx.Err() == nil {
		// The client blocks until it connects, so this loop waits on
		// the server, not on a timer.
		attempt, stop := context.WithTimeout(ctx, 2*time.Second)
		_, last = cli.Get(attempt, "etcdtest-health")
		stop()
		if last == nil {
			return nil
		}
	}
	select {
	case <-done:
		return fmt.Errorf("etcd member %s exited while starting; its log:\n%s", m.Name, m.tail())
	default:
	}
	return fmt.Errorf("etcd member %s not healthy after %v (%v); its log:\n%s", m.Name, startTimeout, last, m.tail())
}

// tail returns the end of the member's log, for failure messages.
func (m *Member) tail() string {
	b, err := os.ReadFile(m.logPath)
	if err != nil {
		return err.Error()
	}
	const max = 4000
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

// Kill stops the member at once (SIGKILL, as a crash would) and waits for
// the process to exit. Killing a stopped member does nothing.
func (m *Member) Kill() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return
	}
	_ = m.cmd.Process.Kill()
	<-m.done
	m.cmd, m.done = nil, nil
}

// Restart starts a killed member again on its data directory and waits
// until it serves linearizable reads.
func (m *Member) Restart(t testing.TB) {
	t.Helper()
	if err := m.start("existing", ""); err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), startTimeout)
	defer cancel()
	if err := m.waitHealthy(ctx); err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
}

// freePorts returns n distinct loopback ports that were free a moment ago.
// All are held open until all are chosen, so they differ.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// The binary's shared server, started by the first Server call and
// stopped by Main.
var (
	mainCalled bool
	sharedMu   sync.Mutex
	shared     *Cluster
	sharedErr  error
	sharedDir  string
)

// Main runs the tests and kills the package's etcd server, if a test
// started one. Call it as os.Exit(etcdtest.Main(m)).
func Main(m *testing.M) int {
	sharedMu.Lock()
	mainCalled = true
	sharedMu.Unlock()
	code := m.Run()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		shared.kill()
	}
	if sharedDir != "" {
		_ = os.RemoveAll(sharedDir)
	}
	return code
}

// Server returns the client URLs of the test binary's etcd: the cluster
// named by $CREDBROKER_TEST_ETCD_ENDPOINTS, or a single member this
// package starts on first use (Main kills it). Use Prefix to keep tests
// apart on it.
func Server(t testing.TB) []string {
	t.Helper()
	if eps := os.Getenv(EndpointsEnv); eps != "" {
		return strings.Split(eps, ",")
	}
	bin := Binary(t)
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if !mainCalled {
		t.Fatal("etcdtest.Server needs the package's TestMain to call etcdtest.Main, which stops the server")
	}
	if shared == nil && sharedErr == nil {
		// Not t.TempDir(): the server outlives this test.
		sharedDir, sharedErr = os.MkdirTemp("", "etcdtest-")
		if sharedErr == nil {
			// Bounded by startTimeout, not by this test's context:
			// the server outlives the test.
			shared, sharedErr = startCluster(context.Background(), bin, sharedDir, 1)
			if sharedErr != nil {
				shared.kill()
				shared = nil
			}
		}
	}
	if sharedErr != nil {
		t.Fatalf("etcdtest: %v", sharedErr)
	}
	return shared.Endpoints()
}

// Prefix returns a fresh key prefix for one test ("/credbroker-test/<random>/").
// On an existing cluster ($CREDBROKER_TEST_ETCD_ENDPOINTS) everything
// under it is deleted at the end of the test.
func Prefix(t testing.TB, endpoints []string) string {
	t.Helper()
	r, err := randomHex(8)
	if err != nil {
		t.Fatal(err)
	}
	prefix := "/credbroker-test/" + r + "/"
	if os.Getenv(EndpointsEnv) != "" {
		t.Cleanup(func() {
			if err := deletePrefix(endpoints, prefix); err != nil {
				t.Errorf("etcdtest: deleting %s: %v", prefix, err)
			}
		})
	}
	return prefix
}

func deletePrefix(endpoints []string, prefix string) error {
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = cli.Delete(ctx, prefix, clientv3.WithPrefix())
	return err
}
