package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/broker/postgres/pgcluster"
	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// `brokerd dev --ha`: the demo of `brokerd dev` as a broker group. Three
// etcd members and two brokerd share one lease store; each brokerd is a
// process of its own (this binary, `brokerd run --config`), so that
// killing one is a real crash and the other's takeover is real.

// devHASessionTTL is the demo group's store.etcd.session_ttl: short, so a
// takeover is quick to watch (production keeps the default, docs/ha.md).
const devHASessionTTL = 5 * time.Second

// devHAStopTimeout bounds each brokerd's shutdown before it is killed.
const devHAStopTimeout = 30 * time.Second

// devInstance is one brokerd of the demo group.
type devInstance struct {
	Name       string
	Listen     string
	ConfigPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Pid returns the instance's process id, 0 when it is not running.
func (in *devInstance) Pid() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.cmd == nil {
		return 0
	}
	return in.cmd.Process.Pid
}

func (in *devInstance) running() bool { return in.Pid() != 0 }

// devHASession is what `brokerd dev --ha` set up; tests read it through
// runDevHA's ready callback.
type devHASession struct {
	Dir       string
	Cluster   *pgcluster.Cluster
	Etcd      *etcdcluster.Cluster
	EtcdBin   string
	Instances []*devInstance
}

// devHAOptions are what tests change: the brokerd binary run for each
// instance (default: this executable) and extra environment for it.
type devHAOptions struct {
	Bin string
	Env []string
	// Stdin, when set, is read for lines: each restarts the instances
	// that are not running.
	Stdin io.Reader
}

// runDevHA runs `brokerd dev --ha` until ctx is done, the instances
// serving on listens. ready, if set, is called once both serve.
func runDevHA(ctx context.Context, listens []string, o devHAOptions, stdout, stderr io.Writer, ready func(*devHASession)) (err error) {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	// A taken port should fail in a second, not after two clusters have
	// started. The instances bind them again themselves.
	for _, l := range listens {
		lis, err := net.Listen("tcp", l)
		if err != nil {
			return fmt.Errorf("%w\n(choose other addresses with --listen and --listen-b)", err)
		}
		lis.Close()
	}
	if o.Bin == "" {
		if o.Bin, err = os.Executable(); err != nil {
			return err
		}
	}
	s := &devHASession{}
	s.Dir, err = os.MkdirTemp("", "credbroker-dev-ha-")
	if err != nil {
		return err
	}
	defer func() {
		if rerr := os.RemoveAll(s.Dir); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()

	binDir, err := pgcluster.FindBinDir()
	if err != nil {
		return fmt.Errorf("dev --ha needs PostgreSQL's server binaries (initdb, postgres): %w\n"+
			"Install them with: apt-get install postgresql, or set CREDBROKER_PG_BINDIR", err)
	}
	s.EtcdBin, err = etcdcluster.FindBinary()
	if err != nil {
		return fmt.Errorf("dev --ha: %w\n(`make dev-ha` builds it first)", err)
	}
	fmt.Fprintf(stderr, "brokerd dev --ha: starting a throwaway PostgreSQL cluster (%s)...\n", binDir)
	s.Cluster, err = pgcluster.Start(ctx, pgcluster.Options{BinDir: binDir})
	if err != nil {
		return fmt.Errorf("dev --ha: %w", err)
	}
	defer func() {
		if serr := s.Cluster.Stop(); serr != nil {
			err = errors.Join(err, fmt.Errorf("stop PostgreSQL: %w", serr))
		}
	}()
	adminPassword := rand.Text()
	if err := setUpDevDatabase(ctx, s.Cluster, adminPassword); err != nil {
		return fmt.Errorf("dev --ha: set up database %s: %w", devDatabase, err)
	}

	fmt.Fprintf(stderr, "brokerd dev --ha: starting a three-member etcd cluster (%s)...\n", s.EtcdBin)
	// No fsync: the cluster is thrown away, and three members fsyncing
	// on one laptop disk are slow for no benefit.
	s.Etcd, err = etcdcluster.Start(ctx, etcdcluster.Options{Bin: s.EtcdBin, NoFsync: true})
	if err != nil {
		return fmt.Errorf("dev --ha: %w", err)
	}
	defer func() {
		if serr := s.Etcd.Stop(); serr != nil {
			err = errors.Join(err, fmt.Errorf("stop etcd: %w", serr))
		}
	}()

	pwPath := filepath.Join(s.Dir, devAdmin+".password")
	if err := os.WriteFile(pwPath, []byte(adminPassword+"\n"), 0o600); err != nil {
		return err
	}
	for i, l := range listens {
		in := &devInstance{Name: "broker-" + string(rune('a'+i)), Listen: l}
		in.ConfigPath = filepath.Join(s.Dir, in.Name+".yaml")
		if err := os.WriteFile(in.ConfigPath, []byte(devHAConfig(s, in, pwPath)), 0o600); err != nil {
			return err
		}
		s.Instances = append(s.Instances, in)
	}
	exits := make(chan *devInstance, len(s.Instances))
	defer func() {
		stopDevInstances(s, log)
	}()
	for _, in := range s.Instances {
		if err := startDevInstance(in, o, stderr, exits); err != nil {
			return err
		}
	}
	for _, in := range s.Instances {
		if err := waitInstanceServing(ctx, in, 2*time.Minute); err != nil {
			return err
		}
	}
	// Who leads, for the walk-through: the group's status in etcd,
	// once some instance has won (within the session TTL).
	leader := s.Instances[0]
	if st, err := etcd.Open(ctx, etcd.Options{Endpoints: s.Etcd.Endpoints(), Prefix: etcd.DefaultPrefix}); err == nil {
		deadline := time.Now().Add(devHASessionTTL + 10*time.Second)
		for time.Now().Before(deadline) && ctx.Err() == nil {
			gs, err := st.GroupStatus(ctx)
			if err == nil && gs.Leader != "" {
				for _, in := range s.Instances {
					if in.Name == gs.Leader {
						leader = in
					}
				}
				break
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
		_ = st.Close()
	}
	printHAWalkthrough(stdout, s, leader)
	if ready != nil {
		ready(s)
	}

	lines := make(chan struct{})
	if o.Stdin != nil {
		go func() {
			sc := bufio.NewScanner(o.Stdin)
			for sc.Scan() {
				select {
				case lines <- struct{}{}:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case in := <-exits:
			fmt.Fprintf(stdout, "\n%s exited. If it led, the other instance takes over within session_ttl (%s):\n"+
				"    %s status\nPress Enter here to start %s again; it joins as a follower.\n\n",
				in.Name, devHASessionTTL, ctlFor(s.otherThan(in)), in.Name)
		case <-lines:
			for _, in := range s.Instances {
				if in.running() {
					continue
				}
				if err := startDevInstance(in, o, stderr, exits); err != nil {
					fmt.Fprintf(stdout, "starting %s again: %v\n", in.Name, err)
					continue
				}
				if err := waitInstanceServing(ctx, in, time.Minute); err != nil {
					fmt.Fprintf(stdout, "%s: %v\n", in.Name, err)
					continue
				}
				fmt.Fprintf(stdout, "%s serves again on %s (pid %d)\n", in.Name, in.Listen, in.Pid())
			}
		}
	}
}

func (s *devHASession) otherThan(in *devInstance) *devInstance {
	for _, o := range s.Instances {
		if o != in {
			return o
		}
	}
	return in
}

// devHAConfig is one instance's configuration: the demo's targets and
// roles, on the shared etcd prefix.
func devHAConfig(s *devHASession, in *devInstance, pwPath string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by `brokerd dev --ha`; removed when it stops.\n")
	fmt.Fprintf(&b, "listen: %s\n", strconv.Quote(in.Listen))
	fmt.Fprintf(&b, "instance: %s\n", in.Name)
	fmt.Fprintf(&b, "store:\n  etcd:\n    endpoints: [%s]\n    prefix: %s\n    session_ttl: %s\n",
		strings.Join(s.Etcd.Endpoints(), ", "), etcd.DefaultPrefix, devHASessionTTL)
	fmt.Fprintf(&b, "targets:\n  - name: %s\n    url: %s\n    password_file: %s\n",
		devTargetName, strconv.Quote(s.Cluster.URL(devAdmin, "", devDatabase)), strconv.Quote(pwPath))
	fmt.Fprintf(&b, "roles:\n")
	for _, r := range devRoles {
		fmt.Fprintf(&b, "  - name: %s\n    target: %s\n    proxy_role: %s\n    default_ttl: %s\n    max_ttl: %s\n",
			r.name, devTargetName, r.proxy, r.defaultTTL, r.maxTTL)
	}
	fmt.Fprintf(&b, "dsn_sslmode: disable\n")
	fmt.Fprintf(&b, "reconcile_interval: 1m\n")
	return b.String()
}

// startDevInstance starts the instance's brokerd; its log lines go to
// stderr prefixed with its name, and exits hears of its end.
func startDevInstance(in *devInstance, o devHAOptions, stderr io.Writer, exits chan<- *devInstance) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	cmd := exec.Command(o.Bin, "run", "--config", in.ConfigPath)
	cmd.Env = append(os.Environ(), o.Env...)
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	// Its own process group, so the terminal's Ctrl-C reaches only dev,
	// which stops the instances in order (leases revoked first);
	// Pdeathsig ends an instance whose dev died without stopping it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return fmt.Errorf("start %s: %w", in.Name, err)
	}
	pw.Close()
	go prefixLines(stderr, "["+in.Name+"] ", pr)
	done := make(chan struct{})
	in.cmd, in.done = cmd, done
	go func() {
		_ = cmd.Wait()
		in.mu.Lock()
		if in.cmd == cmd {
			in.cmd = nil
		}
		in.mu.Unlock()
		close(done)
		select {
		case exits <- in:
		default:
		}
	}()
	return nil
}

// prefixLines copies r to w line by line, each line prefixed.
func prefixLines(w io.Writer, prefix string, r io.ReadCloser) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fmt.Fprintf(w, "%s%s\n", prefix, sc.Text())
	}
}

// waitInstanceServing waits until the instance answers gRPC health SERVING, its
// process exits, or the timeout passes.
func waitInstanceServing(ctx context.Context, in *devInstance, timeout time.Duration) error {
	in.mu.Lock()
	done := in.done
	in.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := grpc.NewClient("passthrough:///"+in.Listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	var last error
	for {
		// WaitForReady blocks until the connection is up: this waits on
		// the server, not on a timer.
		attempt, stop := context.WithTimeout(ctx, 2*time.Second)
		resp, err := health.Check(attempt, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		stop()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		last = err
		select {
		case <-done:
			return fmt.Errorf("%s exited while starting (its log is above)", in.Name)
		case <-ctx.Done():
			return fmt.Errorf("%s not serving on %s after %s: %v", in.Name, in.Listen, timeout, last)
		default:
		}
	}
}

// stopDevInstances revokes every lease through a running instance, so
// that the shutdown shows the revocation path (psql sessions ended by the
// broker), then stops the instances (SIGTERM, then SIGKILL for those still
// running after devHAStopTimeout) and waits for them.
func stopDevInstances(s *devHASession, log *slog.Logger) {
	for _, in := range s.Instances {
		if in.running() {
			revokeAllVia(in, log)
			break
		}
	}
	// All at once: one by one, each leader's resignation would hand the
	// leadership to an instance about to stop.
	type running struct {
		in   *devInstance
		cmd  *exec.Cmd
		done chan struct{}
	}
	var rs []running
	for _, in := range s.Instances {
		in.mu.Lock()
		cmd, done := in.cmd, in.done
		in.mu.Unlock()
		if cmd != nil {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			rs = append(rs, running{in, cmd, done})
		}
	}
	deadline := time.After(devHAStopTimeout)
	for _, r := range rs {
		select {
		case <-r.done:
		case <-deadline:
			log.Warn("instance did not stop; killing it", "instance", r.in.Name)
			_ = r.cmd.Process.Kill()
			<-r.done
		}
	}
}

func revokeAllVia(in *devInstance, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("passthrough:///"+in.Listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return
	}
	defer conn.Close()
	admin := credbrokerv1.NewAdminServiceClient(conn)
	total := int64(0)
	for _, r := range devRoles {
		resp, err := admin.RevokeLeases(ctx, &credbrokerv1.RevokeLeasesRequest{Role: r.name})
		if err != nil {
			log.Warn("revoking leases at shutdown", "role", r.name, "err", err)
			continue
		}
		total += int64(resp.GetRevokedCount())
	}
	if total > 0 {
		log.Info("revoked leases at shutdown", "count", total, "via", in.Name)
	}
}

// ctlFor is the brokerctl command line that reaches in.
func ctlFor(in *devInstance) string {
	ctl := "go run ./cmd/brokerctl"
	if _, err := exec.LookPath("brokerctl"); err == nil {
		ctl = "brokerctl"
	}
	return ctl + " --addr " + in.Listen
}

// printHAWalkthrough tells a newcomer what runs and how to watch a
// failover.
func printHAWalkthrough(w io.Writer, s *devHASession, leader *devInstance) {
	a, b := s.Instances[0], s.Instances[1]
	other := s.otherThan(leader)
	c := s.Cluster
	fmt.Fprintf(w, "\ncredbroker dev --ha is ready: two brokerd sharing one lease store on etcd.\n\n")
	for _, in := range s.Instances {
		fmt.Fprintf(w, "  %-9s %-16s pid %-7d config %s\n", in.Name, in.Listen, in.Pid(), in.ConfigPath)
	}
	for _, m := range s.Etcd.Members {
		fmt.Fprintf(w, "  %-9s %-22s pid %-7d (etcd, data in %s)\n", m.Name, m.ClientURL, m.Pid(), m.DataDir)
	}
	fmt.Fprintf(w, "  postgres  %s:%d, database %s (PostgreSQL %d, throwaway)\n", c.Host, c.Port, devDatabase, c.Version)
	// etcdctl, when `make etcd` built it beside etcd: the keys the group
	// keeps, readable (docs/ha.md).
	if ctl := filepath.Join(filepath.Dir(s.EtcdBin), "etcdctl"); fileExists(ctl) {
		fmt.Fprintf(w, "  keys      %s --endpoints %s get --prefix %s --keys-only\n",
			ctl, strings.Join(s.Etcd.Endpoints(), ","), etcd.DefaultPrefix)
	}
	fmt.Fprintf(w, `
Try it in another terminal, from the repository:

  1. A credential from each instance (any instance serves every call):
       %[1]s issue read_only
       %[2]s issue read_only
  2. Both list the same leases (one store):
       %[2]s leases
  3. Who leads (runs expiry, reconciliation and revocations) and since when:
       %[1]s status
  4. Kill the leader, %[3]s now, as a crash would:
       kill -9 %[4]d
     Within session_ttl (%[5]s) the other instance leads; the leases issued
     before are still there and are still revoked on time:
       %[6]s status
       %[6]s leases
  5. Press Enter here to start the killed instance again: it joins as a
     follower. Killing one etcd member (kill -9 on its pid above) changes
     nothing; killing two stops issuing (no quorum) until one is back.

Press Ctrl-C to revoke every lease, stop both brokers, etcd and PostgreSQL,
and remove every temporary file.

`, ctlFor(a), ctlFor(b), leader.Name, leader.Pid(), devHASessionTTL, ctlFor(other))
}

func fileExists(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}
