package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/credbroker/credbroker/internal/buildinfo"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/metrics"
)

// metricsServer is brokerd's metrics.listen: the metrics and the HTTP
// listener serving them with the probes. A nil *metricsServer is
// metrics.listen absent; its methods then do nothing.
type metricsServer struct {
	m    *metrics.Metrics
	lis  net.Listener
	http *http.Server
	// leader reports whether this instance leads its broker group. nil
	// means there is no group to lead in (bbolt): always the leader. The
	// etcd store's election sets it; /readyz then also needs a known
	// leader, and credbroker_is_leader follows it.
	leader func(ctx context.Context) (leading bool, err error)
}

// metricsReadHeaderTimeout bounds a scrape's request headers (slowloris).
const metricsReadHeaderTimeout = 10 * time.Second

// newMetricsServer binds metrics.listen, before anything slow starts, so
// that a taken port fails fast as the gRPC one does.
func newMetricsServer(cfg *config.Config) (*metricsServer, error) {
	if cfg.Metrics.Listen == "" {
		return nil, nil
	}
	network, addr, err := config.ParseListenTLS(cfg.Metrics.Listen, cfg.Security.TLS != nil)
	if err != nil {
		return nil, fmt.Errorf("metrics.listen: %w", err)
	}
	lis, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("metrics.listen: %w", err)
	}
	roles := make([]string, 0, len(cfg.Roles))
	for _, r := range cfg.Roles {
		roles = append(roles, r.Name)
	}
	return &metricsServer{m: metrics.New(buildinfo.Read().Version, roles), lis: lis}, nil
}

// commitObserver is the store's commit observer.
func (s *metricsServer) commitObserver() func(time.Duration) {
	if s == nil {
		return nil
	}
	return s.m.ObserveCommit
}

func (s *metricsServer) unary() grpc.UnaryServerInterceptor {
	if s == nil {
		return nil
	}
	return s.m.UnaryInterceptor()
}

func (s *metricsServer) stream() grpc.StreamServerInterceptor {
	if s == nil {
		return nil
	}
	return s.m.StreamInterceptor()
}

// watch feeds the metrics from the broker's lifecycle events and counts
// the leases already in the store. Start calls it between broker.New and
// broker.Start: no event can then race the count. The count reads every
// lease record once (a second or so for a million).
func (d *Daemon) watchMetrics(ctx context.Context) error {
	s := d.metrics
	if s == nil {
		return nil
	}
	d.broker.WatchLifecycle(s.m.Observe)
	d.broker.WatchActivity(s.m.ObserveActivity)
	if err := s.m.LoadLeases(ctx, d.store); err != nil {
		return fmt.Errorf("metrics: count the leases in the store: %w", err)
	}
	if s.leader == nil {
		s.m.SetLeader(true)
	}
	return nil
}

// serveMetrics serves /metrics, /healthz and /readyz until Close: over
// TLS with the gRPC certificate settings when tls is configured.
func (d *Daemon) serveMetrics() {
	s := d.metrics
	if s == nil {
		return
	}
	health := d.drainer.HealthServer()
	s.m.WatchTargets(func() map[string]bool {
		up := make(map[string]bool, len(d.cfg.Targets))
		for _, t := range d.cfg.Targets {
			r, err := health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: TargetHealthService(t.Name)})
			up[t.Name] = err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING
		}
		return up
	})
	if d.audit != nil {
		s.m.WatchAudit(func() bool { return d.audit.Err() == nil })
	}
	s.http = &http.Server{Handler: s.m.Handler(d.readiness), ReadHeaderTimeout: metricsReadHeaderTimeout,
		// The server's own complaints (a failed TLS handshake, a panic in
		// a handler) go to brokerd's log, not to the process's stderr.
		ErrorLog: slog.NewLogLogger(prefixHandler{d.log.Handler(), "metrics listener: "}, slog.LevelWarn)}
	lis := s.lis
	if d.security.certs != nil {
		lis = tls.NewListener(lis, httpTLSConfig(d.security.certs.ServerConfig()))
	}
	d.background.Go(func() {
		if err := s.http.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics listener stopped", "err", err)
		}
	})
	d.log.Info("serving metrics", "listen", s.lis.Addr().String())
}

// httpTLSConfig is the gRPC listener's TLS configuration (certificates
// reloaded per handshake, client certificates as configured) offering
// HTTP/1.1 beside h2, which Prometheus and curl speak.
func httpTLSConfig(grpcTLS *tls.Config) *tls.Config {
	protos := []string{"h2", "http/1.1"}
	cfg := grpcTLS.Clone()
	cfg.NextProtos = protos
	inner := grpcTLS.GetConfigForClient
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		c, err := inner(hello)
		if c != nil {
			c.NextProtos = protos
		}
		return c, err
	}
	return cfg
}

// readiness is /readyz: the server is not draining nor refusing calls, the
// store answers, at least one target is connected and, in a broker
// group, a leader is known.
func (d *Daemon) readiness(ctx context.Context) error {
	health := d.drainer.HealthServer()
	if r, err := health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return errors.New("the gRPC server is not serving (shutting down, or audit.required and the audit log cannot be written)")
	}
	if _, err := d.store.GroupID(ctx); err != nil {
		return fmt.Errorf("lease store: %w", err)
	}
	if s := d.metrics; s != nil && s.leader != nil {
		leading, err := s.leader(ctx)
		if err != nil {
			return fmt.Errorf("leader unknown: %w", err)
		}
		s.m.SetLeader(leading)
	}
	for _, t := range d.cfg.Targets {
		r, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: TargetHealthService(t.Name)})
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
	}
	return errors.New("no target is reachable")
}

// MetricsAddr is the address metrics.listen bound (the real port when it
// had :0), or nil without metrics.listen.
func (d *Daemon) MetricsAddr() net.Addr {
	if d.metrics == nil {
		return nil
	}
	return d.metrics.lis.Addr()
}

// closeMetrics stops the metrics listener.
func (s *metricsServer) close() {
	if s == nil {
		return
	}
	if s.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.http.Shutdown(ctx)
	}
	_ = s.lis.Close()
}

func (s *metricsServer) reloadFailed(at time.Time, err error) {
	if s != nil {
		s.m.ReloadFailed(at, err)
	}
}

func (s *metricsServer) reloadSucceeded() {
	if s != nil {
		s.m.ReloadSucceeded()
	}
}

// prefixHandler puts prefix before every message: the standard library's
// log.Logger has no attributes to say where a line comes from.
type prefixHandler struct {
	slog.Handler
	prefix string
}

func (h prefixHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Message = h.prefix + strings.TrimSpace(r.Message)
	return h.Handler.Handle(ctx, r)
}

func (h prefixHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return prefixHandler{h.Handler.WithAttrs(attrs), h.prefix}
}

func (h prefixHandler) WithGroup(name string) slog.Handler {
	return prefixHandler{h.Handler.WithGroup(name), h.prefix}
}
