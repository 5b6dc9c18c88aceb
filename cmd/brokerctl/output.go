package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// now is the clock for "in 14m" annotations; a variable so tests can pin it.
var now = time.Now

// printJSON writes m as one protojson document: lowerCamelCase names as the
// API documents them, enums by name, and zero values included (a script
// reads "revokedCount": 0 rather than a missing key).
func (c *cli) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{EmitDefaultValues: true}.Marshal(m)
	if err != nil {
		return err
	}
	// protojson varies its whitespace on purpose (so nobody depends on it);
	// re-indenting gives output that is the same from run to run.
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = c.stdout.Write(out.Bytes())
	return err
}

// printFields writes name/value pairs in two aligned columns.
func (c *cli) printFields(fields [][2]string) error {
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	for _, f := range fields {
		fmt.Fprintf(tw, "%s\t%s\n", f[0], clean(f[1]))
	}
	return tw.Flush()
}

// printTable writes rows (the first is the header) in aligned columns.
func (c *cli) printTable(rows [][]string) error {
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	for _, r := range rows {
		for i, cell := range r {
			if i > 0 {
				fmt.Fprint(tw, "\t")
			}
			if cell == "" {
				cell = "-"
			}
			fmt.Fprint(tw, clean(cell))
		}
		fmt.Fprint(tw, "\n")
	}
	return tw.Flush()
}

func (c *cli) printLease(l *credbrokerv1.Lease) error {
	expires, maxExpires := formatExpiry(l.GetExpireTime().AsTime()), formatExpiry(l.GetMaxExpireTime().AsTime())
	if l.GetEndTime() != nil {
		// An ended lease will not expire "in 14m": show the instants only.
		expires, maxExpires = formatTime(l.GetExpireTime()), formatTime(l.GetMaxExpireTime())
	}
	fields := [][2]string{
		{"lease_id", l.GetId()},
		{"role", l.GetRole()},
		{"state", stateName(l.GetState())},
		{"client", l.GetClient()},
		{"username", l.GetUsername()},
		{"target", l.GetTarget()},
		{"issued", formatTime(l.GetIssueTime())},
		{"expires", expires},
		{"max_expires", maxExpires},
	}
	if l.GetEndTime() != nil {
		fields = append(fields, [2]string{"ended", formatTime(l.GetEndTime())})
	}
	if l.GetRevokeOnDisconnect() {
		fields = append(fields, [2]string{"revoke_on_disconnect", "true"})
	}
	keys := make([]string, 0, len(l.GetMetadata()))
	for k := range l.GetMetadata() {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fields = append(fields, [2]string{"meta." + k, l.GetMetadata()[k]})
	}
	if l.GetLastError() != "" {
		fields = append(fields, [2]string{"last_error", l.GetLastError()})
	}
	fields = append(fields, usageFields(l.GetUsage())...)
	return c.printFields(fields)
}

// usageFields are the lines of a lease's database-side usage: "sessions
// never seen" until a sample saw the user connected.
func usageFields(u *credbrokerv1.LeaseUsage) [][2]string {
	if u.GetFirstSeenTime() == nil {
		return [][2]string{{"sessions", "0 (never seen connected)"}}
	}
	fields := [][2]string{
		{"sessions", fmt.Sprintf("%d (peak %d, %d seen)", u.GetSessions(), u.GetPeakSessions(), u.GetSessionsSeen())},
		{"first_seen", formatTime(u.GetFirstSeenTime())},
		{"last_seen", formatTime(u.GetLastSeenTime())},
	}
	if u.GetApplicationName() != "" {
		fields = append(fields, [2]string{"application_name", u.GetApplicationName()})
	}
	if u.GetClientAddr() != "" {
		fields = append(fields, [2]string{"client_addr", u.GetClientAddr()})
	}
	if u.GetLastQueryStartTime() != nil {
		fields = append(fields, [2]string{"last_query_start", formatTime(u.GetLastQueryStartTime())})
	}
	return fields
}

func (c *cli) printLeaseTable(leases []*credbrokerv1.Lease) error {
	rows := [][]string{{"LEASE", "ROLE", "CLIENT", "USERNAME", "STATE", "EXPIRES", "SESSIONS", "LAST_SEEN"}}
	for _, l := range leases {
		lastSeen := "never"
		if u := l.GetUsage(); u.GetLastSeenTime() != nil {
			lastSeen = formatTime(u.GetLastSeenTime())
		}
		rows = append(rows, []string{
			l.GetId(), l.GetRole(), l.GetClient(), l.GetUsername(), stateName(l.GetState()), formatTime(l.GetExpireTime()),
			strconv.Itoa(int(l.GetUsage().GetSessions())), lastSeen,
		})
	}
	return c.printTable(rows)
}

// stateName prints a state the way --state takes it ("revoke_failed").
func stateName(s credbrokerv1.LeaseState) string {
	for name, v := range stateNames {
		if v == s {
			return name
		}
	}
	return strings.ToLower(strings.TrimPrefix(s.String(), "LEASE_STATE_"))
}

// formatTime prints an instant in UTC, second precision: unambiguous
// whichever zone the reader is in.
func formatTime(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return ""
	}
	return ts.AsTime().UTC().Format(time.RFC3339)
}

// formatExpiry adds how far away an instant is, which is what a reader of
// an expiry wants to know.
func formatExpiry(t time.Time) string {
	if t.IsZero() || t.Unix() == 0 {
		return ""
	}
	s := t.UTC().Format(time.RFC3339)
	d := t.Sub(now()).Round(time.Second)
	switch {
	case d > 0:
		return s + " (in " + shortDuration(d) + ")"
	case d < 0:
		return s + " (" + shortDuration(-d) + " ago)"
	}
	return s + " (now)"
}

// shortDuration prints 15m rather than 15m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// clean keeps a table one line per row and stops a value from a server
// (an error text, metadata) from sending terminal escape sequences.
func clean(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return '?'
		}
		return r
	}, s)
}
