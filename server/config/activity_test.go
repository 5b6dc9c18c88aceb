package config

import (
	"strings"
	"testing"
	"time"
)

const activityRoles = `
store: {path: leases.db}
targets:
  - {name: main, url: "postgres://broker_admin@127.0.0.1:5432/app", password_file: main.password}
roles:
  - {name: read_only, target: main, proxy_role: read_only_role, default_ttl: 15m, max_ttl: 1h%s}
%s`

func TestActivityConfig(t *testing.T) {
	tests := []struct {
		name, role, activity string
		interval, unused     time.Duration
		err, warning         string
	}{
		{name: "defaults", interval: 30 * time.Second},
		{name: "off", activity: "activity: {sample_interval: off}"},
		{name: "zero is off", activity: "activity: {sample_interval: 0s}"},
		{name: "interval", activity: "activity: {sample_interval: 2m}", interval: 2 * time.Minute},
		{name: "below the minimum", activity: "activity: {sample_interval: 500ms}", err: "activity.sample_interval: 500ms is below the minimum"},
		{name: "not a duration", activity: "activity: {sample_interval: often}", err: `activity.sample_interval: "often" is not a duration`},
		{name: "revoke unused", role: ", revoke_unused_after: 10m", interval: 30 * time.Second, unused: 10 * time.Minute},
		{name: "revoke unused without sampling", role: ", revoke_unused_after: 10m", activity: "activity: {sample_interval: off}",
			err: "roles[0].revoke_unused_after: needs activity sampling"},
		{name: "revoke unused below the interval", role: ", revoke_unused_after: 10s",
			err: "roles[0].revoke_unused_after: 10s is shorter than activity.sample_interval"},
		{name: "revoke unused negative", role: ", revoke_unused_after: -1m", err: "roles[0].revoke_unused_after: -1m must be positive"},
		{name: "revoke unused beyond max_ttl", role: ", revoke_unused_after: 2h", interval: 30 * time.Second, unused: 2 * time.Hour,
			warning: "roles[0].revoke_unused_after: 2h is not shorter than max_ttl 1h"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := loadAndValidate(t, strings.TrimSpace(strings.Replace(
				strings.Replace(activityRoles, "%s", tt.role, 1), "%s", tt.activity, 1)))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Activity.SampleInterval != tt.interval || c.Roles[0].RevokeUnusedAfter != tt.unused {
				t.Errorf("sample interval %v, revoke_unused_after %v; want %v, %v", c.Activity.SampleInterval, c.Roles[0].RevokeUnusedAfter, tt.interval, tt.unused)
			}
			found := tt.warning == ""
			for _, w := range c.Warnings {
				found = found || strings.Contains(w, tt.warning)
			}
			if !found {
				t.Errorf("warnings %q, want one containing %q", c.Warnings, tt.warning)
			}
		})
	}
}
