package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// loadConfig reads and validates a configuration file. Its error lists
// every problem, one per line, each with its key path.
func loadConfig(path string) (*config.Config, error) {
	f, err := config.Load(path)
	if err != nil {
		return nil, fmt.Errorf("config %s:\n%w", path, err)
	}
	cfg, err := f.Validate()
	if err != nil {
		return nil, fmt.Errorf("config %s:\n%w", path, err)
	}
	return cfg, nil
}

// logConfig logs the effective configuration (no password: only where
// each one comes from) and the warnings of validation.
func logConfig(log *slog.Logger, cfg *config.Config) {
	for _, w := range cfg.Warnings {
		log.Warn("config: " + w)
	}
	for _, t := range cfg.Targets {
		log.Info("target", "name", t.Name, "url", t.URL, "password_source", t.PasswordSource,
			"marker_role", t.MarkerRole, "max_conns", t.MaxConns)
	}
	sec := cfg.Security
	// Token hashes and the HMAC key are not logged; how many and where from is.
	log.Info("security", "authentication", sec.Enabled(), "tls", sec.TLS != nil,
		"mutual_tls", sec.TLS != nil && sec.TLS.ClientCAFile != "", "tokens", len(sec.Tokens),
		"admins", sec.Admins, "audit_path", sec.Audit.Path, "audit_hmac", sec.Audit.HMACKeySource)
	for _, r := range cfg.Roles {
		log.Info("role", "name", r.Name, "target", r.Target, "proxy_role", r.ProxyRole,
			"allowed", sec.Allowed[r.Name],
			// Strings: the JSON handler would print durations in nanoseconds.
			"default_ttl", r.DefaultTTL.String(), "max_ttl", r.MaxTTL.String())
	}
}

func runServer(ctx context.Context, configPath string, stderr io.Writer) error {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return err
	}
	log := cfg.Log.NewLogger(stderr)
	logConfig(log, cfg)

	// Bind before connecting to the databases: a port that is taken is
	// the cheaper failure to find out about.
	lis, err := listenTLS(cfg.Listen, cfg.Security.TLS != nil)
	if err != nil {
		return err
	}
	defer lis.Close()

	rt, err := config.Build(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer func() {
		if err := rt.Close(); err != nil {
			log.Error("shutdown", "err", err)
		}
	}()
	// The least-privilege check pages through every lease in the store
	// (stale roles): it runs beside serving, not before it, or a store of a
	// million records would keep brokerd from serving for seconds. It is
	// stopped and waited for before rt closes (defers run last first).
	checkCtx, cancelCheck := context.WithCancel(ctx)
	var checked sync.WaitGroup
	checked.Go(func() { logPrivilegeFindings(checkCtx, rt, log) })
	defer checked.Wait()
	defer cancelCheck()
	return serve(ctx, rt, lis, log, nil)
}

// listen binds the configured address. A unix socket left behind by a
// killed brokerd is removed, but only if nothing answers on it; the new
// socket is made 0600, since whoever can connect is trusted as admin.
func listen(addr string) (net.Listener, error) { return listenTLS(addr, false) }

// listenTLS is listen for a server that may serve TLS, which may then
// bind any address (see config.ParseListenTLS).
func listenTLS(addr string, tls bool) (net.Listener, error) {
	network, address, err := config.ParseListenTLS(addr, tls)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := removeStaleSocket(address); err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
	}
	lis, err := net.Listen(network, address)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("listen %s: address already in use (is another brokerd running?)", addr)
		}
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	if network == "unix" {
		if err := os.Chmod(address, 0o600); err != nil {
			lis.Close()
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
	}
	return lis, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return errors.New("address already in use (is another brokerd running?)")
	}
	return os.Remove(path)
}

// serve starts the broker's background work and serves gRPC on lis until
// ctx is done, then shuts down in order: health NOT_SERVING and KeepAlive
// streams ended (Drain), unary calls in flight allowed to finish for up to
// ShutdownTimeout (GracefulStop), then cut (Stop). ready, if set, is called
// once the server accepts calls. The caller closes rt afterwards, which
// stops the broker's loops before the engines and store close.
func serve(ctx context.Context, rt *config.Runtime, lis net.Listener, log *slog.Logger, ready func()) error {
	// TLS files that do not load are found before the broker starts work.
	sec, err := rt.GRPCSecurity(log)
	if err != nil {
		return err
	}
	if err := rt.Broker.Start(ctx); err != nil {
		return err
	}
	drainer := server.NewDrainer()
	var rotator server.RootRotator
	watchCtx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan struct{})
	if rt.RootCredentials != nil {
		rotator = rt.RootCredentials
		// Re-read the admin passwords' sources and keep Vault tokens alive.
		go func() {
			defer close(watchDone)
			rt.RootCredentials.Watch(watchCtx)
		}()
	} else {
		close(watchDone)
	}
	defer func() {
		stopWatch()
		<-watchDone
	}()
	gs := server.NewGRPCServer(server.Config{
		Broker:        rt.Broker,
		Authenticator: sec.Authenticator,
		Authorizer:    sec.Authorizer,
		Quotas:        sec.Quotas,
		Auditor:       sec.Auditor,
		Logger:        log,
		Endpoints:     rt.Endpoints,
		SSLMode:       rt.Config.DSNSSLMode,
		Drainer:       drainer,
		RootRotator:   rotator,
	}, sec.ServerOptions...)
	if rt.Audit != nil {
		rt.Audit.Record(audit.Record{Event: audit.EventStart, Outcome: audit.OutcomeOK,
			Message: fmt.Sprintf("serving on %s (tls: %t, authentication: %t)", lis.Addr(), sec.Certs != nil, rt.Config.Security.Enabled())})
	}
	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(lis) }()
	log.Info("serving", "listen", lis.Addr().String())
	if ready != nil {
		ready()
	}

	var serveErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case serveErr = <-errc:
		log.Error("gRPC server stopped", "err", serveErr)
	}
	drainer.Drain()
	stopped := make(chan struct{})
	go func() {
		gs.GracefulStop()
		close(stopped)
	}()
	timeout := rt.Config.ShutdownTimeout
	select {
	case <-stopped:
	case <-time.After(timeout):
		log.Warn("calls still running after the shutdown timeout; cutting them", "shutdown_timeout", timeout)
		gs.Stop()
		<-stopped
	}
	if serveErr != nil {
		return fmt.Errorf("serve: %w", serveErr)
	}
	return nil
}

func checkCmd(stdout, stderr io.Writer) *cobra.Command {
	var (
		configPath string
		connect    bool
	)
	cmd := &cobra.Command{
		Use:   "check --config FILE [--connect]",
		Short: "Validate a configuration file (and, with --connect, its targets and proxy roles)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath == "" {
				return usageError{errors.New("--config FILE is required")}
			}
			cfg, err := loadConfig(configPath)
			if err != nil {
				return err
			}
			for _, w := range cfg.Warnings {
				fmt.Fprintf(stderr, "warning: %s\n", w)
			}
			if connect {
				// The store is left alone: a running brokerd holds it
				// locked, and checking before a restart is the point.
				if err := config.CheckTargets(cmd.Context(), cfg, cfg.Log.NewLogger(stderr)); err != nil {
					return err
				}
			}
			fmt.Fprintf(stdout, "%s: ok (%d target(s), %d role(s))\n", configPath, len(cfg.Targets), len(cfg.Roles))
			return nil
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "configuration file (YAML)")
	cmd.Flags().BoolVar(&connect, "connect", false, "also connect to every target and check every role's proxy role")
	return cmd
}
