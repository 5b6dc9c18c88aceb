package config

// MetricsFile is the metrics section.
type MetricsFile struct {
	// Listen is the HTTP address of /metrics, /healthz and /readyz;
	// absent, brokerd serves none of them.
	Listen string `yaml:"listen"`
}

// Metrics configures the metrics and probe listener.
type Metrics struct {
	// Listen is host:port, or "" for none. Without tls it must be on
	// loopback, as gRPC's; with tls it serves HTTPS with the same
	// certificate and may bind anywhere.
	Listen string
}

// metrics validates the metrics section. The listener is off by default:
// an address brokerd binds without being asked could collide with
// whatever else runs beside it, and scraping is a choice an operator
// makes together with the scrape configuration.
func (v *validator) metrics(f *File) Metrics {
	m := Metrics{Listen: f.Metrics.Listen}
	if m.Listen == "" {
		return m
	}
	network, _, err := ParseListenTLS(m.Listen, f.TLS != nil)
	switch {
	case err != nil:
		v.errorf("metrics.listen", "%v", err)
	case network != "tcp":
		v.errorf("metrics.listen", "%q: want host:port, not a unix socket (Prometheus scrapes over TCP)", m.Listen)
	}
	return m
}
