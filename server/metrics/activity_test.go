package metrics

import (
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/credbroker/credbroker/broker"
)

// TestObserveActivity: the usage gauges follow each report, a role with
// no live lease left goes back to 0, and each target's sample is counted
// by result.
func TestObserveActivity(t *testing.T) {
	m := New("test", []string{"read_only", "updater"})
	m.ObserveActivity(broker.ActivityReport{
		Targets: map[string]error{"main": nil, "replica": errors.New("down")},
		Roles: map[string]broker.RoleActivity{
			"read_only": {Leases: 3, Sessions: 5, NeverUsed: 1},
			"updater":   {Leases: 2, Sessions: 0, NeverUsed: 2},
		},
	})
	m.ObserveActivity(broker.ActivityReport{
		Targets: map[string]error{"main": nil},
		Roles:   map[string]broker.RoleActivity{"read_only": {Leases: 2, Sessions: 4}},
	})
	for _, c := range []struct {
		name string
		got  float64
		want float64
	}{
		{"sessions read_only", value(t, m.leaseSessions.WithLabelValues("read_only")), 4},
		{"never used read_only", value(t, m.neverUsed.WithLabelValues("read_only")), 0},
		{"sessions updater (no live lease left)", value(t, m.leaseSessions.WithLabelValues("updater")), 0},
		{"never used updater (no live lease left)", value(t, m.neverUsed.WithLabelValues("updater")), 0},
		{"samples main ok", value(t, m.activitySamples.WithLabelValues("main", SampleOK)), 2},
		{"samples replica error", value(t, m.activitySamples.WithLabelValues("replica", SampleError)), 1},
		{"samples replica ok", value(t, m.activitySamples.WithLabelValues("replica", SampleOK)), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

// value reads one gauge's or counter's current value.
func value(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var out dto.Metric
	if err := c.Write(&out); err != nil {
		t.Fatal(err)
	}
	if out.Gauge != nil {
		return out.Gauge.GetValue()
	}
	return out.Counter.GetValue()
}
