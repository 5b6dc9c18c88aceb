// Package metrics owns credbroker's Prometheus metrics: their names and
// labels (pinned in DESIGN.md "Metrics"), how they are fed (the broker's
// lifecycle events, gRPC interceptors, the store's commit observer) and
// the HTTP handler that serves them beside the /healthz and /readyz
// probes. It uses its own registry, never the process-wide default, so
// two brokers in one test binary do not share counters.
//
// No label value is ever a lease id, a username or a client identity:
// those are unbounded, and the audit log is where they belong.
package metrics
