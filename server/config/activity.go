package config

import (
	"fmt"
	"strings"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// ActivityFile is the activity section.
type ActivityFile struct {
	// SampleInterval is how often each target's pg_stat_activity is
	// sampled for the leases' usage; "off" (or 0) turns sampling off.
	SampleInterval string `yaml:"sample_interval"`
}

// Activity configures the sampling of the targets' sessions (usage per
// lease, roles[].revoke_unused_after).
type Activity struct {
	// SampleInterval is the time between samples; 0 means off.
	SampleInterval time.Duration
}

// MinActivitySampleInterval bounds activity.sample_interval from below:
// each sample is a query per target and a store commit.
const MinActivitySampleInterval = time.Second

// activity validates the activity section. Sampling is on by default: it
// costs one query per target per interval, and it is what shows whether
// an issued credential is used at all.
func (v *validator) activity(f *File) Activity {
	raw := strings.TrimSpace(f.Activity.SampleInterval)
	switch raw {
	case "":
		return Activity{SampleInterval: broker.DefaultActivityInterval}
	case "off", "0":
		return Activity{}
	}
	d, err := time.ParseDuration(raw)
	switch {
	case err != nil:
		v.errorf("activity.sample_interval", "%q is not a duration (a duration such as 30s or 1m, or off)", raw)
	case d == 0:
		return Activity{}
	case d < MinActivitySampleInterval:
		v.errorf("activity.sample_interval", "%s is below the minimum of %s (or write off)", raw, MinActivitySampleInterval)
	default:
		return Activity{SampleInterval: d}
	}
	return Activity{}
}

// revokeUnused checks roles[i].revoke_unused_after against the sampling
// it depends on and the role's max_ttl.
func (v *validator) revokeUnused(roles []broker.Role, a Activity, f *File) {
	for i, r := range roles {
		if r.RevokeUnusedAfter <= 0 {
			continue
		}
		p := fmt.Sprintf("roles[%d].revoke_unused_after", i)
		switch {
		case a.SampleInterval == 0:
			v.errorf(p, "needs activity sampling, which activity.sample_interval turns off")
		case r.RevokeUnusedAfter < a.SampleInterval:
			v.errorf(p, "%s is shorter than activity.sample_interval %s: a lease would be judged before it was sampled",
				f.Roles[i].RevokeUnusedAfter, a.SampleInterval)
		case r.MaxTTL > 0 && r.RevokeUnusedAfter >= r.MaxTTL:
			v.warnf(p, "%s is not shorter than max_ttl %s: no lease lives long enough to be revoked as unused",
				f.Roles[i].RevokeUnusedAfter, f.Roles[i].MaxTTL)
		}
	}
}
