package metrics

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ReadyFunc says why the broker is not ready, or nil when it is.
type ReadyFunc func(ctx context.Context) error

// readyTimeout bounds one /readyz check: a probe that hangs is worse than
// one that fails.
const readyTimeout = 2 * time.Second

// Handler serves /metrics (Prometheus text from m's registry), /healthz
// (200 while the process serves HTTP at all) and /readyz (200 when ready
// says so, else 503 with its reason).
func (m *Metrics) Handler(ready ReadyFunc) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
		defer cancel()
		detail := m.reloadDetail()
		if err := ready(ctx); err != nil {
			if detail != "" {
				detail = "\n" + strings.TrimSuffix(detail, "\n")
			}
			http.Error(w, "not ready: "+err.Error()+detail, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n" + detail))
	})
	return mux
}
