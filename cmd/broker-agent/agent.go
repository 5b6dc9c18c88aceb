package main

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/credbroker/credbroker/clients/credbroker"
)

// shutdownTimeout bounds the revocation on exit.
const shutdownTimeout = 30 * time.Second

type agent struct {
	cfg    *config
	log    *slog.Logger
	render *renderer
	client *credbroker.Client
	keeper *credbroker.Keeper

	// observe, when set (tests), is called after each keeper event was
	// handled: the file rendered, the child signalled.
	observe func(credbroker.Event)
	// healthAddr receives the /healthz listener's address (tests).
	healthAddr chan string

	rendered string // lease id last rendered
	child    *child
}

func newAgent(cfg *config, log *slog.Logger) (*agent, error) {
	for _, d := range cfg.deprecated {
		log.Warn("deprecated setting name; use the new one", "old", d.oldName, "new", d.newName)
	}
	r, err := newRenderer(cfg)
	if err != nil {
		return nil, err
	}
	opts := []credbroker.Option{credbroker.WithLogger(log)}
	if cfg.tlsCA != "" || cfg.tlsCert != "" || cfg.tlsKey != "" {
		tc, err := credbroker.TLSFiles(cfg.tlsCA, cfg.tlsCert, cfg.tlsKey, cfg.tlsServerName)
		if err != nil {
			return nil, err
		}
		opts = append(opts, credbroker.WithTLS(tc))
	}
	if cfg.tokenFile != "" {
		opts = append(opts, credbroker.WithBearerTokenFile(cfg.tokenFile))
	}
	client, err := credbroker.Dial(cfg.broker, opts...)
	if err != nil {
		return nil, err
	}
	a := &agent{cfg: cfg, log: log, render: r, client: client}
	a.keeper = client.NewKeeper(credbroker.KeeperOptions{
		Issue: credbroker.IssueRequest{
			Role: cfg.role, TTL: cfg.ttl, Metadata: cfg.metadata, RevokeOnDisconnect: cfg.revokeOnDisconnect,
		},
		Increment:     cfg.increment,
		Overlap:       cfg.overlap,
		ReplaceBefore: cfg.replaceBefore,
		// An unknown role or a revoked token is not going to change
		// while we retry: say so and exit, for the supervisor to see.
		StopOnPermanentError: true,
	})
	return a, nil
}

// run is the agent's life; it returns the exit status.
func (a *agent) run(ctx context.Context, sigs <-chan os.Signal) int {
	defer a.client.Close()
	runCtx, stopKeeper := context.WithCancel(context.Background())
	keeperDone := make(chan struct{})
	var keeperErr error // set before keeperDone closes
	go func() {
		defer close(keeperDone)
		keeperErr = a.keeper.Run(runCtx)
	}()
	stop := func() {
		stopKeeper()
		<-keeperDone
	}

	if a.cfg.healthListen != "" {
		srv, err := a.serveHealth()
		if err != nil {
			a.log.Error("cannot serve /healthz", "err", err)
			stop()
			return 1
		}
		defer srv.Close()
	}

	a.log.Info("issuing credential", "broker", a.cfg.broker, "role", a.cfg.role)
	select {
	case <-a.keeper.Ready():
	case <-keeperDone:
		// A permanent refusal (an unknown role, a bad token): retrying
		// would only repeat it.
		a.log.Error("the broker refused the credential; not retrying", "role", a.cfg.role, "err", keeperErr)
		stop()
		return 1
	case <-ctx.Done():
		stop()
		return 0
	case s := <-sigs:
		if s == syscall.SIGTERM || s == syscall.SIGINT {
			a.log.Info("signal before the first credential; exiting", "signal", s.String())
			stop()
			return a.shutdown(0)
		}
	}
	lease, cred, _ := a.keeper.Current()
	if err := a.render.render(dataOf(lease, cred)); err != nil {
		a.log.Error("cannot write the credential file", "path", a.cfg.outPath, "err", err)
		stop()
		return a.shutdown(1)
	}
	a.rendered = lease.ID
	a.log.Info("credential ready", "lease_id", lease.ID, "username", lease.Username, "expire_time", lease.ExpireTime, "path", a.cfg.outPath)

	var childExit <-chan int
	if len(a.cfg.command) > 0 {
		c, err := startChild(a.cfg.command, envOf(dataOf(lease, cred)))
		if err != nil {
			a.log.Error("cannot start the command", "command", a.cfg.command[0], "err", err)
			stop()
			return a.shutdown(1)
		}
		a.child = c
		childExit = c.exited
		a.log.Info("command started", "command", a.cfg.command[0], "pid", c.pid())
	}

	terminating := false
	for {
		select {
		case ev := <-a.keeper.Events():
			a.handle(ev)
			if a.child != nil {
				childExit = a.child.exited
			}
			if a.observe != nil {
				a.observe(ev)
			}
		case s := <-sigs:
			sig, ok := s.(syscall.Signal)
			if !ok {
				continue
			}
			if a.child != nil {
				a.log.Info("forwarding signal", "signal", sig.String(), "pid", a.child.pid())
				a.child.signal(sig)
				if sig == syscall.SIGTERM || sig == syscall.SIGINT {
					terminating = true
				}
				continue
			}
			if sig == syscall.SIGTERM || sig == syscall.SIGINT {
				a.log.Info("terminating", "signal", sig.String())
				stop()
				return a.shutdown(0)
			}
		case <-keeperDone:
			// A permanent refusal after a credential was held: the role
			// was removed from brokerd's configuration, or the token
			// revoked. No new credential will come, so stop now rather
			// than hold one that cannot be replaced.
			a.log.Error("the broker refused to go on; exiting", "role", a.cfg.role, "err", keeperErr)
			stop()
			if a.child != nil {
				a.child.signal(syscall.SIGTERM)
				<-a.child.exited
			}
			return a.shutdown(1)
		case code := <-childExit:
			a.log.Info("command exited", "code", code, "after_signal", terminating)
			stop()
			return a.shutdown(code)
		case <-ctx.Done():
			if a.child != nil {
				a.child.signal(syscall.SIGTERM)
				code := <-a.child.exited
				stop()
				return a.shutdown(code)
			}
			stop()
			return a.shutdown(0)
		}
	}
}

// handle reacts to one keeper event.
func (a *agent) handle(ev credbroker.Event) {
	switch ev.Type {
	case credbroker.EventIssued, credbroker.EventReplaced:
		if ev.Lease.ID == a.rendered {
			return // the first credential, already rendered
		}
		data := dataOf(ev.Lease, *ev.Credential)
		if err := a.render.render(data); err != nil {
			// The old file stays; the next replacement tries again.
			a.log.Error("cannot write the new credential", "path", a.cfg.outPath, "err", err)
			return
		}
		a.rendered = ev.Lease.ID
		a.log.Info("new credential rendered", "event", ev.Type.String(), "lease_id", ev.Lease.ID,
			"username", ev.Lease.Username, "expire_time", ev.Lease.ExpireTime, "path", a.cfg.outPath)
		if a.child == nil {
			return
		}
		switch a.cfg.onReplace {
		case "signal":
			a.log.Info("signalling the command", "signal", a.cfg.signal.String(), "pid", a.child.pid())
			a.child.signal(a.cfg.signal)
		case "restart":
			a.log.Info("restarting the command", "pid", a.child.pid())
			c, err := a.child.restart(envOf(data))
			if err != nil {
				a.log.Error("cannot restart the command", "err", err)
				return
			}
			a.child = c
		}
	case credbroker.EventRenewed:
		a.log.Debug("lease renewed", "lease_id", ev.Lease.ID, "expire_time", ev.Lease.ExpireTime)
	case credbroker.EventMaxTTLReached:
		a.log.Info("lease reached its max TTL; a successor will be issued", "lease_id", ev.Lease.ID, "max_expire_time", ev.Lease.MaxExpireTime)
	case credbroker.EventRetired:
		a.log.Info("old credential retired", "lease_id", ev.Lease.ID, "username", ev.Lease.Username)
	case credbroker.EventReconnected:
		a.log.Info("KeepAlive stream connected")
		// EventRevoked, EventExpired, EventNotFound, EventDisconnected and
		// EventError: the client library logs them (the agent gives it
		// its logger); a second line here would say the same thing.
	}
}

// shutdown revokes the lease unless told not to, and returns code. Once
// the lease is revoked its user is gone, so the file naming it is removed:
// a reader then finds no file rather than a credential that cannot log in.
// A lease left to expire, or one whose revocation failed, keeps its file,
// since the credential still works until it expires.
func (a *agent) shutdown(code int) int {
	if a.cfg.noRevokeOnExit {
		a.log.Info("leaving the lease to expire (--no-revoke-on-exit)")
		return code
	}
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := a.keeper.Revoke(ctx); err != nil {
		a.log.Error("revoking the lease on exit failed; it expires on its own", "err", err)
		if code == 0 {
			code = 1
		}
		return code
	}
	if l, _, ok := a.keeper.Current(); ok {
		a.log.Info("lease revoked", "lease_id", l.ID)
	}
	if a.rendered != "" && a.cfg.outPath != "" {
		if err := os.Remove(a.cfg.outPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.log.Error("cannot remove the credential file", "path", a.cfg.outPath, "err", err)
			if code == 0 {
				code = 1
			}
		} else {
			a.log.Info("credential file removed", "path", a.cfg.outPath)
		}
	}
	return code
}

// serveHealth serves /healthz: 200 while the agent holds a credential that
// has not expired, 503 otherwise. The body says which lease, never the
// credential.
func (a *agent) serveHealth() (*http.Server, error) {
	lis, err := net.Listen("tcp", a.cfg.healthListen)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		l, _, ok := a.keeper.Current()
		body := map[string]any{"connected": a.keeper.Connected()}
		status := http.StatusServiceUnavailable
		if ok && time.Now().Before(l.ExpireTime) {
			status = http.StatusOK
			body["lease_id"] = l.ID
			body["expire_time"] = l.ExpireTime
		}
		body["status"] = http.StatusText(status)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(body)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("/healthz server stopped", "err", err)
		}
	}()
	a.log.Info("serving /healthz", "addr", lis.Addr().String())
	if a.healthAddr != nil {
		a.healthAddr <- lis.Addr().String()
	}
	return srv, nil
}
