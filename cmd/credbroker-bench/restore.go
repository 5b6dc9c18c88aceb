package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
	"github.com/credbroker/credbroker/store"
)

// serveChildCmd is the hidden subcommand the restore scenario execs when no
// --brokerd binary is given: brokerd's start path (config.Load, Validate,
// daemon.Start, Serve) in a fresh process, so that its start time and
// resident memory are its own.
const serveChildCmd = "__serve"

func serveChild(args []string) int {
	if len(args) != 2 || args[0] != "--config" {
		fmt.Fprintln(os.Stderr, "usage: credbroker-bench __serve --config FILE")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serveConfig(ctx, args[1]); err != nil {
		fmt.Fprintf(os.Stderr, "serve: %v\n", err)
		return 1
	}
	return 0
}

// startProfileEnv names a file for a CPU profile of the served start,
// from exec until the broker has started (see --profile-dir).
const startProfileEnv = "CREDBROKER_BENCH_START_PROFILE"

func serveConfig(ctx context.Context, path string) error {
	stopProfile := func() {}
	if name := os.Getenv(startProfileEnv); name != "" {
		if f, err := os.Create(name); err == nil {
			if err := pprof.StartCPUProfile(f); err == nil {
				stopProfile = sync.OnceFunc(func() { pprof.StopCPUProfile(); f.Close() })
			}
		}
	}
	defer stopProfile()
	f, err := config.Load(path)
	if err != nil {
		return err
	}
	cfg, err := f.Validate()
	if err != nil {
		return err
	}
	// Without the background least-privilege check, so that the start
	// measured is the broker's alone.
	d, err := daemon.Start(ctx, cfg, daemon.Options{Logger: cfg.Log.NewLogger(os.Stderr), SkipPrivilegeCheck: true})
	if err != nil {
		return err
	}
	defer d.Close()
	stopProfile()
	return d.Serve(ctx)
}

// syntheticTarget is the target the synthetic leases name: none the
// served configuration has. Their users do not exist, and the start-up
// reconciliation ends every live lease whose user is missing from its
// target's listing (one revocation each: minutes for 100,000, and then no
// lease would be live); a lease of a target the broker does not serve is
// not checked. So the start measured lacks one thing a real restore's has:
// listing the target's users (one query) and comparing.
const syntheticTarget = "bench-restore-synthetic"

// writeSyntheticStore writes records leases through package store: active
// ones expiring over the next day (so none is due at start-up), the rest
// tombstones that ended within the retention (so none is purged).
func writeSyntheticStore(ctx context.Context, path string, records, active int, role, proxy string) error {
	s, err := store.Open(path, store.Options{NoSync: true})
	if err != nil {
		return err
	}
	defer s.Close()
	now := time.Now()
	const batch = 50_000
	ls := make([]broker.Lease, 0, batch)
	for i := range records {
		issue := now.Add(-time.Duration(i%86_000) * time.Second)
		l := broker.Lease{
			ID:            "syn" + randHex(10), // random, as the broker's ids are: live leases are spread over the file
			Role:          role,
			Client:        "svc-" + strconv.Itoa(i%50),
			Target:        syntheticTarget,
			Username:      "cb_" + role + "_" + randHex(8),
			ProxyRole:     proxy,
			IssueTime:     issue,
			ExpireTime:    issue.Add(time.Hour),
			MaxExpireTime: issue.Add(24 * time.Hour),
			State:         broker.StateExpired,
			EndTime:       issue.Add(time.Hour),
		}
		if i < active {
			l.State = broker.StateActive
			l.EndTime = time.Time{}
			l.ExpireTime = now.Add(time.Hour + time.Duration(i%82_800)*time.Second)
		}
		ls = append(ls, l)
		if len(ls) == batch || i == records-1 {
			if err := s.ImportLeases(ctx, ls); err != nil {
				return err
			}
			ls = ls[:0]
		}
	}
	return nil
}

// startMeasurement is one start of a server process.
type startMeasurement struct {
	toServing time.Duration
	rssKB     int64 // VmRSS once serving, and a second later: the larger
	hwmKB     int64 // VmHWM: the peak while starting
}

// measureStart execs the server on a store and times it from exec to the
// first answered gRPC health check.
func (e *env) measureStart(ctx context.Context, dir, storePath, profile string) (startMeasurement, error) {
	var m startMeasurement
	port, err := freePort()
	if err != nil {
		return m, err
	}
	cfgFile, err := e.writeConfig(dir, fmt.Sprintf("127.0.0.1:%d", port), storePath, "log: {level: warn}\n")
	if err != nil {
		return m, err
	}
	// Hand the marker role over from the previous start's group (see
	// runRestore); nothing when it does not exist yet.
	var exists bool
	if err := e.base.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", e.markerRole).Scan(&exists); err != nil {
		return m, err
	}
	if exists {
		if _, err := e.base.Exec(ctx, "COMMENT ON ROLE "+postgres.QuoteIdentifier(e.markerRole)+" IS NULL"); err != nil {
			return m, fmt.Errorf("handing the restore marker role over: %w", err)
		}
	}
	var cmd *exec.Cmd
	if e.opts.brokerd != "" {
		cmd = exec.CommandContext(ctx, e.opts.brokerd, "--config", cfgFile)
	} else {
		self, err := os.Executable()
		if err != nil {
			return m, err
		}
		cmd = exec.CommandContext(ctx, self, serveChildCmd, "--config", cfgFile)
		if e.opts.profileDir != "" && profile != "" {
			if err := os.MkdirAll(e.opts.profileDir, 0o755); err != nil {
				return m, err
			}
			cmd.Env = append(os.Environ(), startProfileEnv+"="+filepath.Join(e.opts.profileDir, profile))
		}
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	// gRPC's default reconnect backoff starts at 1s, which would round
	// every start up to a second: retry the connection every few ms.
	conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", port), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 2 * time.Millisecond, Multiplier: 1, MaxDelay: 2 * time.Millisecond}}))
	if err != nil {
		return m, err
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)

	start := time.Now()
	if err := cmd.Start(); err != nil {
		return m, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	for {
		cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		resp, err := health.Check(cctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			m.toServing = time.Since(start)
			break
		}
		select {
		case err := <-exited:
			exited <- err
			return m, fmt.Errorf("server exited before serving (%v): %s", err, strings.TrimSpace(stderr.String()))
		case <-ctx.Done():
			return m, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
		if time.Since(start) > 5*time.Minute {
			return m, errors.New("server not serving after 5 minutes")
		}
	}
	pid := cmd.Process.Pid
	m.rssKB, m.hwmKB, err = procMemory(pid)
	if err != nil {
		return m, err
	}
	// Background work right after start (the first reconciliation, the
	// garbage collector) may still move RSS: read it again a second later.
	time.Sleep(time.Second)
	if rss, hwm, err := procMemory(pid); err == nil {
		m.rssKB, m.hwmKB = max(m.rssKB, rss), max(m.hwmKB, hwm)
	}
	return m, nil
}

// procMemory reads VmRSS and VmHWM (kB) from /proc/PID/status.
func procMemory(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "VmRSS:":
			rss = v
		case "VmHWM:":
			hwm = v
		}
	}
	return rss, hwm, sc.Err()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// runRestore measures a start on a store of --restore-records leases
// (--restore-active live), against the same start on an empty store.
func (e *env) runRestore(ctx context.Context, rep *report) error {
	dir := filepath.Join(e.tmp, "restore")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	full := filepath.Join(dir, "full.db")
	// Each measured start is a broker group of its own (its own store), so
	// it gets a marker role of its own: on the bench's, the served broker's
	// group owns it and a second group must refuse to start (DESIGN.md "A
	// broker group owns its marker role"). The role is handed over between
	// the two starts and dropped at the end; neither start issues a user.
	served := e.markerRole
	e.markerRole = served + "_restore"
	defer func() {
		_, _ = e.base.Exec(context.WithoutCancel(ctx), "DROP ROLE IF EXISTS "+postgres.QuoteIdentifier(e.markerRole))
		e.markerRole = served
	}()
	t := time.Now()
	if err := writeSyntheticStore(ctx, full, e.opts.restoreRecords, e.opts.restoreActive, e.role, e.proxyRole); err != nil {
		return fmt.Errorf("restore: writing the synthetic store: %w", err)
	}
	fi, err := os.Stat(full)
	if err != nil {
		return err
	}
	rep.note("restore: synthetic store of %d records (%d active) written in %s, %d MB",
		e.opts.restoreRecords, e.opts.restoreActive, fmtDur(time.Since(t)), fi.Size()>>20)
	// Each start is measured --rounds times, alternating empty and full;
	// figures are medians with their spread.
	var toServingE, toServingF, rssE, rssF, hwmF series
	for r := range e.opts.rounds {
		empty, err := e.measureStart(ctx, dir, filepath.Join(dir, "empty.db"), "")
		if err != nil {
			return fmt.Errorf("restore: empty store: %w", err)
		}
		profile := ""
		if r == 0 {
			profile = "start.pprof"
		}
		// A fresh copy each time: a start changes the store (its leases'
		// users do not exist, so the broker settles them), and each start
		// must find what the first found.
		run := filepath.Join(dir, "run.db")
		if err := copyFile(full, run); err != nil {
			return err
		}
		m, err := e.measureStart(ctx, dir, run, profile)
		if err != nil {
			return fmt.Errorf("restore: %w", err)
		}
		progress := fmt.Sprintf("restore round %d: empty %s, full %s", r+1, fmtDur(empty.toServing), fmtDur(m.toServing))
		e.log.Info(progress)
		toServingE, toServingF = append(toServingE, empty.toServing.Seconds()), append(toServingF, m.toServing.Seconds())
		rssE, rssF, hwmF = append(rssE, float64(empty.rssKB)), append(rssF, float64(m.rssKB)), append(hwmF, float64(m.hwmKB))
	}
	how := "self-exec of brokerd's start path"
	if e.opts.brokerd != "" {
		how = filepath.Base(e.opts.brokerd)
	}
	sc := fmt.Sprintf("restore %d records (%d active), %s", e.opts.restoreRecords, e.opts.restoreActive, how)
	rep.add(row{scenario: sc, figure: "exec → serving", broker: toServingF.format(fmtSecs), baseline: toServingE.format(fmtSecs) + " (empty store)",
		ratio: ratios(toServingF, toServingE).format(fmtRatio), target: "≤ 2s", met: verdict(toServingF.median() <= 2)})
	rep.add(row{scenario: sc, figure: "RSS after start (peak)", broker: rssF.format(fmtKBasMB) + " (" + hwmF.format(fmtKBasMB) + ")",
		baseline: rssE.format(fmtKBasMB) + " (empty store)", ratio: ratios(rssF, rssE).format(fmtRatio),
		target: "≤ 300 MB", met: verdict(rssF.median() <= 300<<10)})
	// What one more live lease costs a running broker: the expiry heap,
	// the caches, the store's pages touched at start (the tombstones
	// around them included).
	perLease := make(series, 0, len(rssF))
	for i := range min(len(rssF), len(rssE)) {
		perLease = append(perLease, (rssF[i]-rssE[i])*1024/float64(max(e.opts.restoreActive, 1)))
	}
	rep.add(row{scenario: sc, figure: "RSS per live lease ((full − empty) ÷ active)", broker: perLease.format(fmtBytes), baseline: "—"})
	return nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
