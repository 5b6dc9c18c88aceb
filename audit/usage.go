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
}

// Usage counts, per role and identity, the lifecycle events and the denied
// and over-quota requests whose time is in [from, to) (a zero bound is
// open). Issued, renewed, revoked and expired come from lifecycle records,
// whose identity is the lease's owner; denied and quota from request
// records, whose identity is the caller (empty when it could not be
// authenticated). Successful requests are not counted again: their lease's
// lifecycle record already is.
//
// Usage does not verify the chain; run Verify for that.
func Usage(r io.Reader, from, to time.Time) ([]UsageRow, error) {
	rows := map[[2]string]*UsageRow{}
	row := func(rec *Record) *UsageRow {
		k := [2]string{rec.Role, rec.Identity}
		u, ok := rows[k]
		if !ok {
			u = &UsageRow{Role: rec.Role, Identity: rec.Identity}
			rows[k] = u
		}
		return u
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
			row(&rec).Issued++
		case broker.AuditRenew:
			row(&rec).Renewed++
		case broker.AuditRevoke:
			row(&rec).Revoked++
		case broker.AuditExpire:
			row(&rec).Expired++
		case EventRequest:
			switch rec.Outcome {
			case OutcomeDenied:
				row(&rec).Denied++
			case OutcomeQuota:
				row(&rec).Quota++
			}
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
