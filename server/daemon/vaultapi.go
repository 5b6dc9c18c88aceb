package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/credbroker/credbroker/internal/buildinfo"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/vaultapi"
)

// vaultAPIServer is brokerd's vault_api.listen: the Vault-compatible HTTP
// API, whose requests are calls of the gRPC server's services made
// through invoker. A nil *vaultAPIServer is vault_api.listen absent.
type vaultAPIServer struct {
	lis     net.Listener
	invoker *server.Invoker
	http    *http.Server
	served  chan struct{}
}

// Timeouts of the Vault API's HTTP server. An issue or a revocation can
// take seconds (PostgreSQL, a slow disk); a client that sends its
// headers slowly is cut.
const (
	vaultAPIReadHeaderTimeout = 10 * time.Second
	vaultAPIReadTimeout       = 30 * time.Second
	vaultAPIIdleTimeout       = 2 * time.Minute
)

// newVaultAPIServer binds vault_api.listen, before anything slow starts,
// so that a taken port fails fast as the gRPC one does.
func newVaultAPIServer(cfg *config.Config) (*vaultAPIServer, error) {
	if cfg.VaultAPI.Listen == "" {
		return nil, nil
	}
	network, addr, err := config.ParseListenTLS(cfg.VaultAPI.Listen, cfg.Security.TLS != nil)
	if err != nil {
		return nil, fmt.Errorf("vault_api.listen: %w", err)
	}
	lis, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("vault_api.listen: %w", err)
	}
	return &vaultAPIServer{lis: lis, invoker: server.NewInvoker(), served: make(chan struct{})}, nil
}

// serverInvoker is what server.Config.Invoker gets: nil without the API.
func (s *vaultAPIServer) serverInvoker() *server.Invoker {
	if s == nil {
		return nil
	}
	return s.invoker
}

// serveVaultAPI serves the API until stopServing or Close: over TLS with
// the gRPC listener's certificate and client CA when tls is configured,
// so a client certificate names the same identity on both.
func (d *Daemon) serveVaultAPI() error {
	s := d.vaultAPI
	if s == nil {
		return nil
	}
	h, err := vaultapi.New(vaultapi.Config{
		Invoker: s.invoker,
		Mount:   d.cfg.VaultAPI.Mount,
		Ready:   d.readiness,
		Version: buildinfo.Read().Version,
		Logger:  d.log,
	})
	if err != nil {
		return fmt.Errorf("vault_api: %w", err)
	}
	s.http = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: vaultAPIReadHeaderTimeout,
		ReadTimeout:       vaultAPIReadTimeout,
		IdleTimeout:       vaultAPIIdleTimeout,
		// net/http's own complaints (a failed TLS handshake, a plaintext
		// request on the TLS port) go to brokerd's log, not stderr.
		ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	lis := s.lis
	if d.security.certs != nil {
		lis = tls.NewListener(lis, httpTLSConfig(d.security.certs.ServerConfig()))
	}
	d.background.Go(func() {
		defer close(s.served)
		if err := s.http.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("vault_api listener stopped", "err", err)
		}
	})
	d.log.Info("serving the Vault-compatible API", "listen", s.lis.Addr().String(), "mount", d.cfg.VaultAPI.Mount)
	return nil
}

// shutdown stops accepting requests and lets those in flight finish
// within timeout, then cuts them.
func (s *vaultAPIServer) shutdown(timeout time.Duration) {
	if s == nil {
		return
	}
	if s.http == nil {
		_ = s.lis.Close()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := s.http.Shutdown(ctx); err != nil {
		_ = s.http.Close()
	}
}

// VaultAPIAddr is the address vault_api.listen bound (the real port when
// it had :0), or nil without vault_api.listen.
func (d *Daemon) VaultAPIAddr() net.Addr {
	if d.vaultAPI == nil {
		return nil
	}
	return d.vaultAPI.lis.Addr()
}
