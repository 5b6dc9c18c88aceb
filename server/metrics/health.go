package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Names of the health metrics the example alerts use beside the pinned
// ones (DESIGN.md allows more): both are read at scrape time from the
// state brokerd already keeps, so they cannot drift from what /readyz and
// the gRPC health services say.
const (
	// TargetUpName is 1 per target brokerd is connected to, 0 while it
	// reconnects (the gRPC health service credbroker.target.<name>).
	TargetUpName = "credbroker_target_up"
	// AuditWritableName is 1 while the audit log takes records, 0 after a
	// write failed and until one succeeds again.
	AuditWritableName = "credbroker_audit_writable"
)

var (
	targetUpDesc = prometheus.NewDesc(TargetUpName,
		"1 when brokerd is connected to the target, 0 while it is unreachable and retried.",
		[]string{"target"}, nil)
	auditWritableDesc = prometheus.NewDesc(AuditWritableName,
		"1 while the audit log can be written, 0 after a write failed (audit.required then refuses calls).",
		nil, nil)
)

// WatchTargets exports credbroker_target_up{target} from up, which
// returns every configured target and whether it is connected. It is
// called at each scrape, so it must be quick. Call it once.
func (m *Metrics) WatchTargets(up func() map[string]bool) {
	m.reg.MustRegister(funcCollector{desc: targetUpDesc, collect: func(ch chan<- prometheus.Metric) {
		for name, ok := range up() {
			ch <- prometheus.MustNewConstMetric(targetUpDesc, prometheus.GaugeValue, boolValue(ok), name)
		}
	}})
}

// WatchAudit exports credbroker_audit_writable from writable, called at
// each scrape. brokerd calls it only when an audit log is configured, so
// the metric's absence means "no audit log", not "not writable". Call it
// once.
func (m *Metrics) WatchAudit(writable func() bool) {
	m.reg.MustRegister(funcCollector{desc: auditWritableDesc, collect: func(ch chan<- prometheus.Metric) {
		ch <- prometheus.MustNewConstMetric(auditWritableDesc, prometheus.GaugeValue, boolValue(writable()))
	}})
}

// funcCollector is a collector of one metric family computed at scrape.
type funcCollector struct {
	desc    *prometheus.Desc
	collect func(chan<- prometheus.Metric)
}

func (c funcCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }
func (c funcCollector) Collect(ch chan<- prometheus.Metric) { c.collect(ch) }

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
