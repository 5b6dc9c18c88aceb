package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/broker/postgres"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// childBroker is a broker in a process of its own (--brokerd, else this
// binary's copy of brokerd's start path), as in production: its CPU time
// and resident memory are its own, read from /proc, and --pin can put it on
// other CPUs than PostgreSQL's. It is a broker group of its own (its own
// store file and marker role), beside the bench's in-process broker.
type childBroker struct {
	cmd    *exec.Cmd
	exited chan error
	marker string
	conn   *grpc.ClientConn
	cred   pb.CredentialServiceClient
	adminC pb.AdminServiceClient
	stderr *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 64<<10 { // keep the start of it: the first error explains
		return len(p), nil
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startChild starts a broker process serving the bench's role on the
// bench's target with marker role marker, its store at storePath (which
// may already hold leases), and waits until it answers health checks.
func (e *env) startChild(ctx context.Context, name, marker, storePath string) (*childBroker, error) {
	dir := filepath.Join(e.tmp, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cfgFile, err := e.writeConfig(dir, addr, storePath, "log: {level: warn}\n")
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(cfgFile)
	if err != nil {
		return nil, err
	}
	yml := strings.Replace(string(raw), "marker_role: "+e.markerRole+"\n", "marker_role: "+marker+"\n", 1)
	if err := os.WriteFile(cfgFile, []byte(yml), 0o600); err != nil {
		return nil, err
	}
	// A marker role left claimed by an earlier group (an interrupted run
	// against --pg-url) is handed over, as the restore scenario does.
	var exists bool
	if err := e.base.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", marker).Scan(&exists); err != nil {
		return nil, err
	}
	if exists {
		if _, err := e.base.Exec(ctx, "COMMENT ON ROLE "+postgres.QuoteIdentifier(marker)+" IS NULL"); err != nil {
			return nil, fmt.Errorf("handing marker role %s over: %w", marker, err)
		}
	}
	var cmd *exec.Cmd
	if e.opts.brokerd != "" {
		cmd = exec.Command(e.opts.brokerd, "--config", cfgFile)
	} else {
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		cmd = exec.Command(self, serveChildCmd, "--config", cfgFile)
	}
	b := &childBroker{cmd: cmd, exited: make(chan error, 1), marker: marker, stderr: &lockedBuffer{}}
	cmd.Stderr = b.stderr
	// Never outlive the bench.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	b.conn, err = grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1, MaxDelay: 10 * time.Millisecond}}))
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		_ = b.conn.Close()
		return nil, err
	}
	go func() { b.exited <- cmd.Wait() }()
	health := healthpb.NewHealthClient(b.conn)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := health.Check(cctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			break
		}
		select {
		case err := <-b.exited:
			b.exited <- err
			_ = b.conn.Close()
			return nil, fmt.Errorf("broker process exited before serving (%v): %s", err, strings.TrimSpace(b.stderr.String()))
		case <-ctx.Done():
			b.stop()
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.stop()
			return nil, errors.New("broker process not serving after 2 minutes")
		}
	}
	b.cred = pb.NewCredentialServiceClient(b.conn)
	b.adminC = pb.NewAdminServiceClient(b.conn)
	e.children = append(e.children, b)
	if e.pinned {
		if err := setProcessAffinity(b.pid(), e.cpus.rest); err != nil {
			b.stop()
			return nil, err
		}
	}
	return b, nil
}

func (b *childBroker) pid() int { return b.cmd.Process.Pid }

// stop ends the process (SIGTERM, then SIGKILL after 20 s) and waits for it.
func (b *childBroker) stop() {
	_ = b.conn.Close()
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-b.exited:
		b.exited <- err
	case <-time.After(20 * time.Second):
		_ = b.cmd.Process.Kill()
		err := <-b.exited
		b.exited <- err
	}
}

// stopChild stops b, forgets it and drops its marker role (best effort:
// a member left by a failed cleanup keeps it, in a throwaway cluster).
func (e *env) stopChild(ctx context.Context, b *childBroker) {
	b.stop()
	for i, c := range e.children {
		if c == b {
			e.children = append(e.children[:i], e.children[i+1:]...)
			break
		}
	}
	_, _ = e.base.Exec(context.WithoutCancel(ctx), "DROP ROLE IF EXISTS "+postgres.QuoteIdentifier(b.marker))
}

// cpu is the process's CPU time so far (user + system), from
// /proc/PID/stat in clock ticks (10 ms on Linux).
func (b *childBroker) cpu() (time.Duration, error) { return procCPU(b.pid()) }

func procCPU(pid int) (time.Duration, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(raw))
}

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc.
const clockTicks = 100

// parseStatCPU is utime + stime of a /proc/PID/stat line: fields 14 and 15
// counting from 1, i.e. the 12th and 13th after the command's ")".
func parseStatCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc/PID/stat")
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 13 {
		return 0, errors.New("malformed /proc/PID/stat")
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("malformed /proc/PID/stat")
	}
	return time.Duration(u+s) * time.Second / clockTicks, nil
}

// selfCPU is the bench process's own CPU time so far.
func selfCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// threadCPU is the calling OS thread's CPU time so far (the caller locks
// its goroutine to the thread).
func threadCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
