package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// UsageRow counts what happened for one role and identity.
type UsageRow struct {
	Role     string `json:"role"`
	Identity string `json:"identity"`
	Issued   int    `json:"issued"`
	Renewed  int    `json:"renewed"`
	Revoked  int    `json:"revoked"`
	Expired  int    `json:"expired"`
	Denied   int    `json:"denied"`
	Quota    int    `json:"quota_exceeded"`
	// Used counts the leases seen connected; Unused those that ended
	// (or, with live lease data, are live) never seen connected;
	// RevokedUnused those revoked for it (reason unused). Sessions sums
	// the distinct sessions seen of the leases counted in Used.
	Used          int `json:"used"`
	Unused        int `json:"unused"`
	RevokedUnused int `json:"revoked_unused"`
	Sessions      int `json:"sessions"`
}

// LiveLease is what a running broker knows of one lease's usage
// (brokerctl reads it with ListLeases), to join with the audit log: it is
// newer than the log's last record of the lease.
type LiveLease struct {
	ID           string
	Role         string
	Identity     string
	Ended        bool
	Used         bool
	SessionsSeen int
}

// leaseUse is what the log, then the live data, says of one lease.
type leaseUse struct {
	role, identity string
	ended, used    bool
	known          bool // a record or live data said whether it was used
	sessions       int
}

// Usage counts, per role and identity, the lifecycle events and the denied
// and over-quota requests whose time is in [from, to) (a zero bound is
// open). Issued, renewed, revoked and expired come from lifecycle records,
// whose identity is the lease's owner; denied and quota from request
// records, whose identity is the caller (empty when it could not be
// authenticated). Successful requests are not counted again: their lease's
// lifecycle record already is.
//
// Used, unused and sessions come from the usage the broker's activity
// sampler recorded: a lease's first_use record, and the final usage on its
// revoke or expire record. A lease still live has no final record; live
// (the broker's current leases) fills that in for the leases the log's
// window mentions. Without it, a live lease that was never seen connected
// counts in neither Used nor Unused.
//
// Usage does not verify the chain; run Verify for that.
func Usage(r io.Reader, from, to time.Time, live ...LiveLease) ([]UsageRow, error) {
	rows := map[[2]string]*UsageRow{}
	row := func(role, identity string) *UsageRow {
		k := [2]string{role, identity}
		u, ok := rows[k]
		if !ok {
			u = &UsageRow{Role: role, Identity: identity}
			rows[k] = u
		}
		return u
	}
	leases := map[string]*leaseUse{}
	lease := func(rec *Record) *leaseUse {
		lu, ok := leases[rec.LeaseID]
		if !ok {
			lu = &leaseUse{role: rec.Role, identity: rec.Identity}
			leases[rec.LeaseID] = lu
		}
		return lu
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	line := 0
	for sc.Scan() {
		line++
		var rec Record
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			return nil, fmt.Errorf("line %d: not a JSON audit record", line)
		}
		if !from.IsZero() && rec.Time.Before(from) || !to.IsZero() && !rec.Time.Before(to) {
			continue
		}
		switch rec.Event {
		case broker.AuditIssue:
			row(rec.Role, rec.Identity).Issued++
			if rec.LeaseID != "" {
				lease(&rec)
			}
		case broker.AuditRenew:
			row(rec.Role, rec.Identity).Renewed++
		case broker.AuditRevoke, broker.AuditExpire:
			if rec.Event == broker.AuditRevoke {
				row(rec.Role, rec.Identity).Revoked++
				if rec.Reason == broker.ReasonUnused {
					row(rec.Role, rec.Identity).RevokedUnused++
				}
			} else {
				row(rec.Role, rec.Identity).Expired++
			}
			if rec.LeaseID != "" && rec.Usage != nil {
				lu := lease(&rec)
				lu.ended, lu.known, lu.used = true, true, rec.Usage.Used()
				lu.sessions = rec.Usage.SessionsSeen
			}
		case broker.AuditFirstUse:
			if rec.LeaseID != "" {
				lu := lease(&rec)
				if !lu.ended {
					lu.known, lu.used = true, true
					lu.sessions = max(lu.sessions, rec.Usage.sessionsSeen())
				}
			}
		case EventRequest:
			switch rec.Outcome {
			case OutcomeDenied:
				row(rec.Role, rec.Identity).Denied++
			case OutcomeQuota:
				row(rec.Role, rec.Identity).Quota++
			}
		}
	}
	for _, l := range live {
		lu, ok := leases[l.ID]
		if !ok {
			continue // outside the window
		}
		lu.known, lu.ended, lu.used, lu.sessions = true, l.Ended, l.Used, l.SessionsSeen
	}
	for _, lu := range leases {
		if !lu.known {
			continue
		}
		u := row(lu.role, lu.identity)
		if lu.used {
			u.Used++
			u.Sessions += lu.sessions
		} else {
			u.Unused++
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	out := make([]UsageRow, 0, len(rows))
	for _, u := range rows {
		out = append(out, *u)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Role != out[j].Role {
			return out[i].Role < out[j].Role
		}
		return out[i].Identity < out[j].Identity
	})
	return out, nil
}
