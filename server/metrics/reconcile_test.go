package metrics_test

import (
	"testing"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/server/metrics"
)

// TestReconcileRevocationsHaveARole: credbroker_revoked_total{reason=
// "reconcile"} counts a lease reconciliation ended under the lease's role,
// and a user it dropped with no lease (no role on the event) under
// metrics.RoleUnknown, never under an empty role; both series exist from
// the start.
func TestReconcileRevocationsHaveARole(t *testing.T) {
	m := metrics.New("test", []string{"app"})
	// revoked maps each role label of the reconcile series to its value.
	revoked := func() map[string]float64 {
		t.Helper()
		mfs, err := m.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			if mf.GetName() != "credbroker_revoked_total" {
				continue
			}
			for _, s := range mf.GetMetric() {
				labels := map[string]string{}
				for _, lp := range s.GetLabel() {
					labels[lp.GetName()] = lp.GetValue()
				}
				if labels["reason"] == metrics.ReasonReconcile {
					out[labels["role"]] = s.GetCounter().GetValue()
				}
			}
		}
		return out
	}
	if got := revoked(); len(got) != 2 || got["app"] != 0 || got[metrics.RoleUnknown] != 0 {
		t.Errorf("reconcile series at start: %v, want app and %s at 0", got, metrics.RoleUnknown)
	}

	// A lease whose user was gone, ended by reconciliation.
	m.Observe(broker.AuditEvent{Action: broker.AuditRevoke, LeaseID: "l1", Role: "app", Reason: broker.ReasonReconcile})
	// A marker-role member no lease knows, and an intent's user without
	// its lease: reconcile_drop events with no role.
	m.Observe(broker.AuditEvent{Action: broker.AuditReconcileDrop, Target: "main", Username: "cb_app_x"})
	m.Observe(broker.AuditEvent{Action: broker.AuditReconcileDrop, LeaseID: "l2", Target: "main", Username: "cb_app_y"})

	got := revoked()
	if _, ok := got[""]; ok {
		t.Errorf("credbroker_revoked_total{reason=%q,role=\"\"} exists: %v", metrics.ReasonReconcile, got)
	}
	if got["app"] != 1 || got[metrics.RoleUnknown] != 2 || len(got) != 2 {
		t.Errorf("reconcile series %v, want app 1 and %s 2", got, metrics.RoleUnknown)
	}
	if err := broker.ValidateRoleName(metrics.RoleUnknown); err == nil {
		t.Errorf("%q is a valid role name: a role of that name would share its series", metrics.RoleUnknown)
	}
}
