package metrics

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/credbroker/credbroker/broker"
)

// Reasons of credbroker_revoked_total. expired, revoked, disconnect and
// unused (roles[].revoke_unused_after) come from the broker's revoke and
// expire events; reconcile from a revoke event of that reason (a lease
// whose user was gone) and from reconcile_drop (a user with no lease).
const (
	ReasonExpired    = broker.ReasonExpired
	ReasonRevoked    = broker.ReasonRevoked
	ReasonDisconnect = broker.ReasonDisconnect
	ReasonUnused     = broker.ReasonUnused
	ReasonReconcile  = "reconcile"
)

// RoleUnknown is the role label of credbroker_revoked_total{reason="reconcile"}
// for a user reconciliation dropped with no lease to name its role (a
// marker-role member no lease knows, or the user of an intent a crash left
// without its lease). A lease that reconciliation ends has its own role. It
// cannot be a broker role's name, which starts with a letter.
const RoleUnknown = "_unknown"

// Results of credbroker_activity_samples_total.
const (
	SampleOK    = "ok"
	SampleError = "error"
)

// Reasons of credbroker_requests_denied_total, from the gRPC status of a
// refused call.
const (
	DeniedUnauthenticated   = "unauthenticated"
	DeniedPermission        = "permission_denied"
	DeniedResourceExhausted = "resource_exhausted" // quotas, rate limits, stream and renewal limits
)

// Metrics holds every credbroker metric and the registry that serves them.
type Metrics struct {
	reg  *prometheus.Registry
	grpc *grpcprom.ServerMetrics

	leases           *prometheus.GaugeVec
	keepAliveStreams prometheus.Gauge
	issued           *prometheus.CounterVec
	renewed          *prometheus.CounterVec
	revoked          *prometheus.CounterVec
	revokeFailures   *prometheus.CounterVec
	denied           *prometheus.CounterVec
	issueDuration    *prometheus.HistogramVec
	expiryLag        prometheus.Histogram
	storeCommit      prometheus.Histogram
	isLeader         prometheus.Gauge
	reloadFailures   prometheus.Counter
	buildInfo        *prometheus.GaugeVec
	leaseSessions    *prometheus.GaugeVec
	neverUsed        *prometheus.GaugeVec
	activitySamples  *prometheus.CounterVec
	// activityRoles are the roles whose usage gauges were set, so that a
	// role with no live lease left goes back to 0.
	activityRoles map[string]bool
	// reloadErr is the last failed reload's message for /readyz, nil
	// once a reload succeeds.
	reloadErr atomic.Pointer[string]

	mu sync.Mutex
	// live maps each live lease to what credbroker_leases counts it as.
	// Keyed by lease id so that a repeated event changes nothing.
	live map[string]leaseKey
}

type leaseKey struct {
	role  string
	state broker.LeaseState
}

// New returns the metrics of a broker serving roles, built as version.
// Every role's counters start at 0, so rate() and increase() work from
// the first scrape rather than from a series' first event.
func New(version string, roles []string) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		grpc: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramBuckets(prometheus.DefBuckets))),
		leases: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "credbroker_leases", Help: "Live leases by role and state (active, revoking, revoke_failed).",
		}, []string{"role", "state"}),
		keepAliveStreams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "credbroker_keepalive_streams", Help: "Open KeepAlive streams.",
		}),
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "credbroker_issued_total", Help: "Leases issued.",
		}, []string{"role"}),
		renewed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "credbroker_renewed_total", Help: "Lease renewals.",
		}, []string{"role"}),
		revoked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "credbroker_revoked_total", Help: "Users dropped, by why: expired, revoked, disconnect, unused, reconcile.",
		}, []string{"role", "reason"}),
		revokeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "credbroker_revoke_failures_total", Help: "Revocation attempts that failed (each is retried).",
		}, []string{"role"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "credbroker_requests_denied_total", Help: "Calls refused: unauthenticated, permission_denied, resource_exhausted.",
		}, []string{"reason"}),
		issueDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "credbroker_issue_duration_seconds", Help: "Time to answer a successful IssueCredential.",
			Buckets: prometheus.DefBuckets,
		}, []string{"role"}),
		expiryLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "credbroker_expiry_lag_seconds", Help: "Time from a lease's expire time to its user being dropped.",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600},
		}),
		storeCommit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "credbroker_store_commit_duration_seconds", Help: "Duration of the lease store's write transactions.",
			Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1},
		}),
		isLeader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "credbroker_is_leader", Help: "1 on the instance that runs expiry and reconciliation (always 1 on bbolt).",
		}),
		reloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "credbroker_config_reload_failures_total", Help: "Configuration reloads that failed.",
		}),
		buildInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "credbroker_build_info", Help: "1, labelled with the running build's version.",
		}, []string{"version"}),
		leaseSessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "credbroker_lease_sessions", Help: "Open database sessions of the role's live leases, at the last activity sample.",
		}, []string{"role"}),
		neverUsed: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "credbroker_leases_never_used", Help: "Live leases whose user no activity sample has seen connected.",
		}, []string{"role"}),
		activitySamples: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "credbroker_activity_samples_total", Help: "Samples of a target's pg_stat_activity, by result (ok, error).",
		}, []string{"target", "result"}),
		activityRoles: make(map[string]bool),
		live:          make(map[string]leaseKey),
	}
	m.reg.MustRegister(m.grpc, m.leases, m.keepAliveStreams, m.issued, m.renewed, m.revoked,
		m.revokeFailures, m.denied, m.issueDuration, m.expiryLag, m.storeCommit, m.isLeader,
		m.reloadFailures, m.buildInfo, m.leaseSessions, m.neverUsed, m.activitySamples,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.buildInfo.WithLabelValues(version).Set(1)
	for _, role := range roles {
		m.issued.WithLabelValues(role)
		m.renewed.WithLabelValues(role)
		m.revokeFailures.WithLabelValues(role)
		for _, reason := range []string{ReasonExpired, ReasonRevoked, ReasonDisconnect, ReasonUnused, ReasonReconcile} {
			m.revoked.WithLabelValues(role, reason)
		}
		m.leases.WithLabelValues(role, broker.StateActive.String())
		m.leaseSessions.WithLabelValues(role)
		m.neverUsed.WithLabelValues(role)
		m.activityRoles[role] = true
	}
	// A user reconciliation drops without a lease has no role.
	m.revoked.WithLabelValues(RoleUnknown, ReasonReconcile)
	for _, reason := range []string{DeniedUnauthenticated, DeniedPermission, DeniedResourceExhausted} {
		m.denied.WithLabelValues(reason)
	}
	return m
}

// ReloadFailed counts a configuration reload that changed nothing
// (credbroker_config_reload_failures_total) and shows why in /readyz
// until a reload succeeds. The broker stays ready: it serves with the
// configuration it had.
func (m *Metrics) ReloadFailed(at time.Time, err error) {
	m.reloadFailures.Inc()
	msg := fmt.Sprintf("config: the reload at %s failed; the previous configuration is in force:\n%v\n", at.UTC().Format(time.RFC3339), err)
	m.reloadErr.Store(&msg)
}

// ReloadSucceeded clears what ReloadFailed showed in /readyz.
func (m *Metrics) ReloadSucceeded() { m.reloadErr.Store(nil) }

func (m *Metrics) reloadDetail() string {
	if p := m.reloadErr.Load(); p != nil {
		return *p
	}
	return ""
}

// Registry is the registry the handler serves.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// SetLeader sets credbroker_is_leader.
func (m *Metrics) SetLeader(leading bool) {
	v := 0.0
	if leading {
		v = 1
	}
	m.isLeader.Set(v)
}

// ObserveCommit records one store write transaction (store.Options.CommitObserver).
func (m *Metrics) ObserveCommit(d time.Duration) { m.storeCommit.Observe(d.Seconds()) }

// LoadLeases counts the store's live leases. Call it after Observe is
// watching the broker's events and before the broker starts its work
// (broker.Start), so that no event can race the scan.
func (m *Metrics) LoadLeases(ctx context.Context, s broker.LeaseStore) error {
	f := broker.LeaseFilter{Limit: 1000}
	for {
		page, next, err := s.ListLeases(ctx, f)
		if err != nil {
			return err
		}
		m.mu.Lock()
		for i := range page {
			if page[i].State.Live() {
				m.set(page[i].ID, leaseKey{page[i].Role, page[i].State.Public()})
			}
		}
		m.mu.Unlock()
		if next == "" {
			return nil
		}
		f.After = next
	}
}

// Observe applies one lifecycle event (broker.WatchLifecycle). It runs in
// the broker's call that committed the event, so it only touches maps and
// counters.
//
// A lease whose revocation has begun counts as ACTIVE until the outcome
// is known: the broker reports the end (revoke, expire) or the failure
// (revoke_failed, with REVOKING or REVOKE_FAILED), not the start.
func (m *Metrics) Observe(ev broker.AuditEvent) {
	if ev.Remote {
		// Another instance of the group did it and counts it; the
		// leases gauge is the group's, so it follows.
		m.mu.Lock()
		switch ev.Action {
		case broker.AuditIssue:
			m.set(ev.LeaseID, leaseKey{ev.Role, broker.StateActive})
		case broker.AuditRevoke, broker.AuditExpire:
			m.drop(ev.LeaseID)
		case broker.AuditRevokeFailed:
			m.set(ev.LeaseID, leaseKey{ev.Role, ev.State})
		}
		m.mu.Unlock()
		return
	}
	switch ev.Action {
	case broker.AuditIssue:
		m.issued.WithLabelValues(ev.Role).Inc()
		m.mu.Lock()
		m.set(ev.LeaseID, leaseKey{ev.Role, broker.StateActive})
		m.mu.Unlock()
	case broker.AuditRenew:
		m.renewed.WithLabelValues(ev.Role).Inc()
	case broker.AuditRevoke, broker.AuditExpire:
		reason := ev.Reason
		if reason == "" {
			reason = ReasonRevoked
		}
		m.revoked.WithLabelValues(ev.Role, reason).Inc()
		if ev.Action == broker.AuditExpire && !ev.ExpireTime.IsZero() {
			m.expiryLag.Observe(max(ev.Time.Sub(ev.ExpireTime), 0).Seconds())
		}
		m.mu.Lock()
		m.drop(ev.LeaseID)
		m.mu.Unlock()
	case broker.AuditRevokeFailed:
		m.revokeFailures.WithLabelValues(ev.Role).Inc()
		m.mu.Lock()
		m.set(ev.LeaseID, leaseKey{ev.Role, ev.State})
		m.mu.Unlock()
	case broker.AuditReconcileDrop:
		role := ev.Role
		if role == "" {
			role = RoleUnknown
		}
		m.revoked.WithLabelValues(role, ReasonReconcile).Inc()
	}
}

// ObserveActivity applies one activity sample's report
// (broker.WatchActivity): the usage gauges per role, and the sample's
// result per target.
func (m *Metrics) ObserveActivity(rep broker.ActivityReport) {
	for target, err := range rep.Targets {
		result := SampleOK
		if err != nil {
			result = SampleError
		}
		m.activitySamples.WithLabelValues(target, result).Inc()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for role := range m.activityRoles {
		if _, ok := rep.Roles[role]; !ok {
			m.leaseSessions.WithLabelValues(role).Set(0)
			m.neverUsed.WithLabelValues(role).Set(0)
		}
	}
	for role, a := range rep.Roles {
		m.activityRoles[role] = true
		m.leaseSessions.WithLabelValues(role).Set(float64(a.Sessions))
		m.neverUsed.WithLabelValues(role).Set(float64(a.NeverUsed))
	}
}

// set moves lease id to k in credbroker_leases. Callers hold mu.
func (m *Metrics) set(id string, k leaseKey) {
	if old, ok := m.live[id]; ok {
		if old == k {
			return
		}
		m.leases.WithLabelValues(old.role, old.state.String()).Dec()
	}
	m.live[id] = k
	m.leases.WithLabelValues(k.role, k.state.String()).Inc()
}

// drop removes lease id from credbroker_leases. Callers hold mu.
func (m *Metrics) drop(id string) {
	if old, ok := m.live[id]; ok {
		delete(m.live, id)
		m.leases.WithLabelValues(old.role, old.state.String()).Dec()
	}
}
