package privcheck

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// Severity ranks a least-privilege finding. The zero value is SeverityInfo.
type Severity int

// Severities, from the least to the most urgent.
const (
	SeverityInfo Severity = iota
	SeverityLow
	SeverityMedium
	SeverityHigh
	SeverityCritical
)

var severityNames = []string{"info", "low", "medium", "high", "critical"}

func (s Severity) String() string {
	if s < 0 || int(s) >= len(severityNames) {
		return fmt.Sprintf("severity(%d)", int(s))
	}
	return severityNames[s]
}

// MarshalText implements encoding.TextMarshaler, so JSON shows the name.
func (s Severity) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// ParseSeverity parses a severity name (info, low, medium, high, critical).
func ParseSeverity(name string) (Severity, error) {
	i := slices.Index(severityNames, strings.ToLower(name))
	if i < 0 {
		return 0, fmt.Errorf("unknown severity %q (one of %s)", name, strings.Join(severityNames, ", "))
	}
	return Severity(i), nil
}

// Checks, the Finding.Check values.
const (
	CheckProxyMissing    = "proxy-missing"    // a configured proxy role does not exist
	CheckProxyLogin      = "proxy-login"      // a proxy role can log in
	CheckProxyAttribute  = "proxy-attribute"  // SUPERUSER, CREATEROLE, CREATEDB, BYPASSRLS, REPLICATION (itself or by membership)
	CheckProxyGrantAll   = "grant-all"        // every privilege on an object
	CheckReadOnlyWrites  = "read-only-writes" // a role named read-only may write
	CheckOverlap         = "overlap"          // two proxy roles with identical privileges
	CheckNoPrivileges    = "no-privileges"    // a proxy role that grants nothing
	CheckStale           = "stale"            // a broker role not issued for a long time
	CheckAdminSuperuser  = "admin-superuser"  // the broker's admin is a superuser
	CheckAdminAttributes = "admin-attribute"  // the admin holds attributes it does not need
)

// Finding is one least-privilege problem on a target.
type Finding struct {
	Severity Severity `json:"severity"`
	Check    string   `json:"check"`
	// Target is the broker's name for the PostgreSQL server (set by the
	// caller; the engine does not know it).
	Target string `json:"target,omitempty"`
	// Role is the PostgreSQL role (or, for stale, the broker role) concerned.
	Role    string `json:"role"`
	Message string `json:"message"`
	// Fix is SQL or advice that removes the finding, when there is one.
	Fix string `json:"fix,omitempty"`
}

// ProxyRoleUse is one broker role's proxy role, as configured.
type ProxyRoleUse struct {
	BrokerRole string
	ProxyRole  string
}

// SortFindings orders findings most severe first, then by target, check
// and role, so output is stable.
func SortFindings(fs []Finding) {
	sort.SliceStable(fs, func(i, j int) bool {
		a, b := fs[i], fs[j]
		if a.Severity != b.Severity {
			return a.Severity > b.Severity
		}
		if a.Target != b.Target {
			return a.Target < b.Target
		}
		if a.Check != b.Check {
			return a.Check < b.Check
		}
		return a.Role < b.Role
	})
}

// LeaseActivity is what the stale check needs to know about a broker
// role: the newest issue time among the leases the store still holds.
type LeaseActivity struct {
	BrokerRole string
	// LastIssued is zero when the store holds no lease of the role.
	LastIssued time.Time
}

// StaleRoles reports broker roles not issued for longer than after. The
// store forgets ended leases after its tombstone retention, so a role with
// no lease at all is reported as "none in the store's memory" when the
// retention is shorter than after. now is the current time.
func StaleRoles(activity []LeaseActivity, after, retention time.Duration, now time.Time) []Finding {
	var out []Finding
	for _, a := range activity {
		switch {
		case a.LastIssued.IsZero() && retention >= after:
			out = append(out, Finding{
				Severity: SeverityLow, Check: CheckStale, Role: a.BrokerRole,
				Message: fmt.Sprintf("broker role issued no lease in the last %s", days(after)),
				Fix:     "remove the role (and its proxy role's grants) if nothing uses it any more",
			})
		case a.LastIssued.IsZero():
			out = append(out, Finding{
				Severity: SeverityInfo, Check: CheckStale, Role: a.BrokerRole,
				Message: fmt.Sprintf("broker role issued no lease the store remembers (ended leases are kept %s; "+
					"set store.tombstone_retention to at least %s to judge staleness)", days(retention), days(after)),
			})
		case now.Sub(a.LastIssued) > after:
			out = append(out, Finding{
				Severity: SeverityLow, Check: CheckStale, Role: a.BrokerRole,
				Message: fmt.Sprintf("broker role last issued a lease %s ago (%s)",
					days(now.Sub(a.LastIssued)), a.LastIssued.UTC().Format(time.RFC3339)),
				Fix: "remove the role (and its proxy role's grants) if nothing uses it any more",
			})
		}
	}
	return out
}

// days prints a duration in whole days (rounded down) once it is a day
// or more.
func days(d time.Duration) string {
	switch n := d / (24 * time.Hour); {
	case n == 1:
		return "1 day"
	case n > 1:
		return fmt.Sprintf("%d days", n)
	}
	return d.String()
}
