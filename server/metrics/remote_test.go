package metrics_test

import (
	"testing"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/server/metrics"
)

// Another instance's issues and ends (AuditEvent.Remote, from the store's
// change feed) move the leases gauge, which counts the group's leases,
// and no counter, which counts this instance's work.
func TestRemoteEventsMoveTheGaugeOnly(t *testing.T) {
	m := metrics.New("test", []string{"app"})
	read := func(name string) float64 {
		t.Helper()
		mfs, err := m.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		sum := 0.0
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, s := range mf.GetMetric() {
				if g := s.GetGauge(); g != nil {
					sum += g.GetValue()
				}
				if c := s.GetCounter(); c != nil {
					sum += c.GetValue()
				}
			}
		}
		return sum
	}
	m.Observe(broker.AuditEvent{Action: broker.AuditIssue, LeaseID: "l1", Role: "app", Remote: true})
	if got := read("credbroker_leases"); got != 1 {
		t.Errorf("credbroker_leases = %v after a remote issue, want 1", got)
	}
	m.Observe(broker.AuditEvent{Action: broker.AuditExpire, LeaseID: "l1", Role: "app", Reason: broker.ReasonExpired, Remote: true})
	if got := read("credbroker_leases"); got != 0 {
		t.Errorf("credbroker_leases = %v after a remote expiry, want 0", got)
	}
	for _, name := range []string{"credbroker_issued_total", "credbroker_revoked_total"} {
		if got := read(name); got != 0 {
			t.Errorf("%s = %v after remote events, want 0", name, got)
		}
	}
}
