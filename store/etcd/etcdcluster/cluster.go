// Package etcdcluster runs a throwaway etcd cluster of separate processes
// on loopback, for `brokerd dev --ha` and the bench's failover and store
// scenarios: members are processes so that one can be killed and
// restarted like a machine. It runs the etcd binary `make etcd` builds
// (FindBinary), keeps every member's data and log in one temporary
// directory, and Stop kills the members and removes that directory. It is
// not for production: a real cluster has its members on three machines
// with TLS (docs/ha.md). The tests' harness is internal/etcdtest.
package etcdcluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Version is the etcd release `make etcd` builds (tools/etcd pins it).
const Version = "v3.7.3"

// BinEnv names the etcd binary to run, as for the tests.
const BinEnv = "CREDBROKER_ETCD_BIN"

// ErrNoBinary is FindBinary's answer when there is no etcd to run.
var ErrNoBinary = errors.New("no etcd binary: run `make etcd` (it builds etcd " + Version + " from source into a cache directory), or set $" + BinEnv)

// FindBinary returns the etcd binary to run: $CREDBROKER_ETCD_BIN, else
// the one `make etcd` leaves in its cache directory (/var/cache/credbroker
// as root, .cache/ in the checkout otherwise), else etcd on $PATH.
func FindBinary() (string, error) {
	if bin := os.Getenv(BinEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("$%s: %w", BinEnv, err)
		}
		return bin, nil
	}
	candidates := []string{filepath.Join("/var/cache/credbroker", "etcd-"+Version, "etcd")}
	if dir, err := os.Getwd(); err == nil {
		for {
			if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
				candidates = append(candidates, filepath.Join(dir, ".cache", "etcd-"+Version, "etcd"))
				break
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return c, nil
		}
	}
	if p, err := exec.LookPath("etcd"); err == nil {
		return p, nil
	}
	return "", ErrNoBinary
}

// Options configures Start.
type Options struct {
	// Bin is the etcd binary (default FindBinary).
	Bin string
	// Members is the cluster's size (default 3).
	Members int
	// NoFsync runs the members with --unsafe-no-fsync. Off by default:
	// a measurement against bbolt with fsync must pay etcd's too.
	NoFsync bool
	// StartTimeout bounds the wait for every member to serve (default
	// 60s: three members on a busy machine).
	StartTimeout time.Duration
}

// Member is one etcd process.
type Member struct {
	Name      string
	ClientURL string
	PeerURL   string
	DataDir   string
	LogPath   string

	bin, cluster, token string
	noFsync             bool

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// Cluster is the members, started together.
type Cluster struct {
	Members []*Member
	// Dir holds every member's data directory and log; Stop removes it.
	Dir string
}

// Start starts the cluster in a new temporary directory and waits until
// every member serves linearizable reads. On error nothing is left
// running and the directory is removed.
func Start(ctx context.Context, o Options) (*Cluster, error) {
	if o.Bin == "" {
		bin, err := FindBinary()
		if err != nil {
			return nil, err
		}
		o.Bin = bin
	}
	if o.Members <= 0 {
		o.Members = 3
	}
	if o.StartTimeout <= 0 {
		o.StartTimeout = 60 * time.Second
	}
	dir, err := os.MkdirTemp("", "credbroker-etcd-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir}
	ok := false
	defer func() {
		if !ok {
			_ = c.Stop()
		}
	}()
	ports, err := freePorts(2 * o.Members)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	token := "credbroker-" + hex.EncodeToString(b)
	var initial []string
	for i := range o.Members {
		m := &Member{
			Name:      fmt.Sprintf("etcd%d", i+1),
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			PeerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
			DataDir:   filepath.Join(dir, fmt.Sprintf("etcd%d", i+1)),
			LogPath:   filepath.Join(dir, fmt.Sprintf("etcd%d.log", i+1)),
			bin:       o.Bin, token: token, noFsync: o.NoFsync,
		}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		m.cluster = strings.Join(initial, ",")
		if err := m.start("new"); err != nil {
			return nil, err
		}
	}
	wctx, cancel := context.WithTimeout(ctx, o.StartTimeout)
	defer cancel()
	for _, m := range c.Members {
		if err := m.waitHealthy(wctx); err != nil {
			return nil, err
		}
	}
	ok = true
	return c, nil
}

// Endpoints returns every member's client URL.
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.Members))
	for i, m := range c.Members {
		out[i] = m.ClientURL
	}
	return out
}

// Stop kills every member, waits for the processes to exit and removes
// the cluster's directory. Stopping twice is not an error.
func (c *Cluster) Stop() error {
	for _, m := range c.Members {
		m.Kill()
	}
	if c.Dir == "" {
		return nil
	}
	err := os.RemoveAll(c.Dir)
	c.Dir = ""
	return err
}

func (m *Member) start(state string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return fmt.Errorf("etcd member %s is running", m.Name)
	}
	logFile, err := os.OpenFile(m.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child has its own descriptor
	args := []string{
		"--name", m.Name,
		"--data-dir", m.DataDir,
		"--listen-client-urls", m.ClientURL,
		"--advertise-client-urls", m.ClientURL,
		"--listen-peer-urls", m.PeerURL,
		"--initial-advertise-peer-urls", m.PeerURL,
		"--initial-cluster", m.cluster,
		"--initial-cluster-state", state,
		"--initial-cluster-token", m.token,
		// As docs/ha.md recommends: renewals fill the history.
		"--auto-compaction-mode", "periodic",
		"--auto-compaction-retention", "1h",
		"--log-level", "warn",
	}
	if m.noFsync {
		args = append(args, "--unsafe-no-fsync")
	}
	cmd := exec.Command(m.bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so the terminal's Ctrl-C reaches the
	// parent, which stops the members in order; Pdeathsig kills a member
	// whose parent died without stopping it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start etcd member %s: %w", m.Name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	m.cmd, m.done = cmd, done
	return nil
}

// Pid returns the member's process id, or 0 when it is not running.
func (m *Member) Pid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return 0
	}
	return m.cmd.Process.Pid
}

// Kill stops the member at once (SIGKILL, as a crash would) and waits for
// its process to exit. Killing a stopped member does nothing.
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

// Restart starts a killed member again on its data and waits until it
// serves linearizable reads.
func (m *Member) Restart(ctx context.Context) error {
	if err := m.start("existing"); err != nil {
		return err
	}
	return m.waitHealthy(ctx)
}

// waitHealthy waits until the member answers a linearizable read (the
// cluster has a leader and this member has joined it), its process exits,
// or ctx ends.
func (m *Member) waitHealthy(ctx context.Context) error {
	m.mu.Lock()
	done := m.done
	m.mu.Unlock()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{m.ClientURL}, DialTimeout: time.Second, Logger: zap.NewNop()})
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
		// The client blocks until it connects: this waits on the
		// server, not on a timer.
		attempt, stop := context.WithTimeout(ctx, 2*time.Second)
		_, last = cli.Get(attempt, "etcdcluster-health")
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
	return fmt.Errorf("etcd member %s not serving (%v); its log:\n%s", m.Name, last, m.tail())
}

func (m *Member) tail() string {
	b, err := os.ReadFile(m.LogPath)
	if err != nil {
		return err.Error()
	}
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// freePorts returns n distinct loopback ports that were free a moment
// ago; all are held until all are chosen, so they differ.
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
