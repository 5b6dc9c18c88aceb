package audit

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// writeLog writes n records to a new log in a temporary directory and
// returns its path.
func writeLog(t *testing.T, key []byte, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Options{HMACKey: key})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	for i := range n {
		l.AuditLease(broker.AuditEvent{Action: broker.AuditIssue, Role: "read_only", Client: "svc", LeaseID: strings.Repeat("a", 31) + string(rune('a'+i%26))})
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return path
}

func readLines(t *testing.T, path string) [][]byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.SplitAfter(bytes.TrimSuffix(data, []byte("\n")), []byte("\n"))
}

func verifyLines(lines [][]byte, key []byte) (VerifyResult, error) {
	var buf bytes.Buffer
	for _, l := range lines {
		buf.Write(l)
		if !bytes.HasSuffix(l, []byte("\n")) {
			buf.WriteByte('\n')
		}
	}
	return Verify(&buf, key)
}

func TestVerifyIntactChain(t *testing.T) {
	for _, key := range [][]byte{nil, []byte("0123456789abcdef0123456789abcdef")} {
		path := writeLog(t, key, 5)
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		res, err := Verify(f, key)
		f.Close()
		if err != nil {
			t.Fatalf("key=%v: Verify: %v", key != nil, err)
		}
		if res.Records != 5 || res.FirstSeq != 1 || res.LastSeq != 5 || len(res.Head) != 64 {
			t.Errorf("key=%v: result %+v, want 5 records seq 1..5 with a head", key != nil, res)
		}
	}
}

func TestVerifyDetectsTampering(t *testing.T) {
	key := []byte("k")
	for _, tc := range []struct {
		name     string
		key      []byte
		tamper   func([][]byte) [][]byte
		wantLine int
	}{
		{"edited line", nil, func(ls [][]byte) [][]byte {
			ls[2] = bytes.Replace(ls[2], []byte(`"identity":"svc"`), []byte(`"identity":"eve"`), 1)
			return ls
		}, 4},
		{"deleted line", nil, func(ls [][]byte) [][]byte { return append(ls[:2:2], ls[3:]...) }, 3},
		{"deleted first line", nil, func(ls [][]byte) [][]byte { return ls[1:] }, 1},
		{"reordered lines", nil, func(ls [][]byte) [][]byte { ls[1], ls[2] = ls[2], ls[1]; return ls }, 2},
		{"inserted copy", nil, func(ls [][]byte) [][]byte {
			return append(ls[:3:3], append([][]byte{ls[1]}, ls[3:]...)...)
		}, 4},
		{"garbage line", nil, func(ls [][]byte) [][]byte { ls[3] = []byte("not json\n"); return ls }, 4},
		{"hmac: edited line", key, func(ls [][]byte) [][]byte {
			ls[0] = bytes.Replace(ls[0], []byte(`"role":"read_only"`), []byte(`"role":"admin"`), 1)
			return ls
		}, 2},
		{"hmac: downgraded to plain sha256", key, func(ls [][]byte) [][]byte {
			ls[1] = bytes.Replace(ls[1], []byte(`"mac":"hmac-sha256",`), nil, 1)
			return ls
		}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := readLines(t, writeLog(t, tc.key, 5))
			if _, err := verifyLines(lines, tc.key); err != nil {
				t.Fatalf("untouched log: %v", err)
			}
			_, err := verifyLines(tc.tamper(lines), tc.key)
			var be *BreakError
			if !errors.As(err, &be) {
				t.Fatalf("Verify = %v, want a BreakError", err)
			}
			if be.Line != tc.wantLine {
				t.Errorf("first broken link at line %d (%s), want line %d", be.Line, be.Reason, tc.wantLine)
			}
		})
	}
}

func TestVerifyNeedsTheRightKey(t *testing.T) {
	path := writeLog(t, []byte("right"), 3)
	lines := readLines(t, path)
	if _, err := verifyLines(lines, nil); err == nil || !strings.Contains(err.Error(), "--hmac-key-file") {
		t.Errorf("without key: %v, want a hint to pass the key", err)
	}
	var be *BreakError
	if _, err := verifyLines(lines, []byte("wrong")); !errors.As(err, &be) || be.Line != 2 {
		t.Errorf("wrong key: %v, want a break at line 2", err)
	}
}

func TestOpenContinuesTheChain(t *testing.T) {
	path := writeLog(t, nil, 2)
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Write(Record{Event: EventStart, Outcome: OutcomeOK}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	f, _ := os.Open(path)
	defer f.Close()
	res, err := Verify(f, nil)
	if err != nil || res.Records != 3 || res.LastSeq != 3 {
		t.Fatalf("after reopening: %+v, %v; want 3 chained records", res, err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestOpenCutsAPartialLastLine(t *testing.T) {
	path := writeLog(t, nil, 2)
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"seq":3,"time":"2026-`) // a crash mid-write
	f.Close()
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	data, _ := os.ReadFile(path)
	if !bytes.Contains(data, []byte(`"event":"recovered"`)) {
		t.Errorf("no recovered record:\n%s", data)
	}
	res, err := Verify(bytes.NewReader(data), nil)
	if err != nil || res.Records != 3 {
		t.Errorf("Verify after recovery: %+v, %v", res, err)
	}
}

func TestOpenRefusesAForeignFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(path, []byte("root:x:0:0::/root:/bin/sh\n"), 0o600)
	if _, err := Open(path, Options{}); err == nil {
		t.Fatal("Open appended to a file that is not an audit log")
	}
}

func TestRecordsAreOneLineAndBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	nasty := "a\nb\"c\x00\xff" + strings.Repeat("x", 5000)
	if err := l.Write(Record{Event: EventRequest, Identity: nasty, Role: nasty, Message: nasty, Outcome: OutcomeDenied}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	lines := readLines(t, path)
	if len(lines) != 1 {
		t.Fatalf("%d lines, want 1", len(lines))
	}
	if len(lines[0]) > 3*(maxField+10)+500 {
		t.Errorf("record is %d bytes; fields are not bounded", len(lines[0]))
	}
	if _, err := verifyLines(lines, nil); err != nil {
		t.Errorf("Verify: %v", err)
	}
}

func TestUsage(t *testing.T) {
	var buf bytes.Buffer
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ev := func(at time.Duration, action, role, who string) {
		l.AuditLease(broker.AuditEvent{Time: t0.Add(at), Action: action, Role: role, Client: who})
	}
	ev(0, broker.AuditIssue, "read_only", "svc-a")
	ev(time.Minute, broker.AuditRenew, "read_only", "svc-a")
	ev(2*time.Minute, broker.AuditRenew, "read_only", "svc-a")
	ev(3*time.Minute, broker.AuditRevoke, "read_only", "svc-a")
	ev(3*time.Minute, broker.AuditIssue, "updater", "svc-b")
	ev(time.Hour, broker.AuditIssue, "read_only", "svc-a") // outside the range
	l.Write(Record{Time: t0.Add(4 * time.Minute), Event: EventRequest, Role: "admin_rw", Identity: "svc-b", Outcome: OutcomeDenied})
	l.Write(Record{Time: t0.Add(4 * time.Minute), Event: EventRequest, Role: "updater", Identity: "svc-b", Outcome: OutcomeQuota})
	l.Write(Record{Time: t0.Add(4 * time.Minute), Event: EventRequest, Role: "updater", Identity: "svc-b", Outcome: OutcomeOK})
	l.Close()
	data, _ := os.ReadFile(path)
	buf.Write(data)
	rows, err := Usage(&buf, t0, t0.Add(30*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	want := []UsageRow{
		{Role: "admin_rw", Identity: "svc-b", Denied: 1},
		{Role: "read_only", Identity: "svc-a", Issued: 1, Renewed: 2, Revoked: 1},
		{Role: "updater", Identity: "svc-b", Issued: 1, Quota: 1},
	}
	if len(rows) != len(want) {
		t.Fatalf("rows %+v, want %+v", rows, want)
	}
	for i := range want {
		if rows[i] != want[i] {
			t.Errorf("row %d = %+v, want %+v", i, rows[i], want[i])
		}
	}
}

// TestUsageCountsActivity: used, unused, sessions and unused revocations
// come from first_use and the final usage of revoke and expire records;
// live lease data settles the leases the log has no end for.
func TestUsageCountsActivity(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ev := func(at time.Duration, action, id, reason string, u broker.LeaseUsage) {
		l.AuditLease(broker.AuditEvent{Time: t0.Add(at), Action: action, LeaseID: id, Role: "read_only", Client: "svc-a", Reason: reason, Usage: u})
	}
	used := broker.LeaseUsage{PeakSessions: 2, SessionsSeen: 3, FirstSeen: t0.Add(time.Minute), LastSeen: t0.Add(5 * time.Minute), ApplicationName: "api\x1b[31m"}
	for _, id := range []string{"a", "b", "c", "d"} {
		ev(0, broker.AuditIssue, id, "", broker.LeaseUsage{})
	}
	ev(time.Minute, broker.AuditFirstUse, "a", "", broker.LeaseUsage{Sessions: 1, PeakSessions: 1, SessionsSeen: 1, FirstSeen: t0.Add(time.Minute), LastSeen: t0.Add(time.Minute)})
	ev(10*time.Minute, broker.AuditExpire, "a", broker.ReasonExpired, used)                                                  // used, 3 sessions
	ev(10*time.Minute, broker.AuditRevoke, "b", broker.ReasonUnused, broker.LeaseUsage{})                                    // never used, revoked for it
	ev(2*time.Minute, broker.AuditFirstUse, "c", "", broker.LeaseUsage{SessionsSeen: 1, FirstSeen: t0.Add(2 * time.Minute)}) // live, used
	// d: live, nothing known from the log
	l.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte("\x1b")) {
		t.Error("an escape sequence from application_name reached the log")
	}

	rows, err := Usage(bytes.NewReader(data), time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	want := UsageRow{Role: "read_only", Identity: "svc-a", Issued: 4, Revoked: 1, Expired: 1, Used: 2, Unused: 1, RevokedUnused: 1, Sessions: 4}
	if len(rows) != 1 || rows[0] != want {
		t.Errorf("rows %+v, want [%+v]", rows, want)
	}

	// The broker's live data: c has seen 5 sessions by now, d none; e is
	// not in the log's window and is ignored.
	live := []LiveLease{
		{ID: "c", Role: "read_only", Identity: "svc-a", Used: true, SessionsSeen: 5},
		{ID: "d", Role: "read_only", Identity: "svc-a"},
		{ID: "e", Role: "read_only", Identity: "svc-a", Used: true, SessionsSeen: 100},
	}
	rows, err = Usage(bytes.NewReader(data), time.Time{}, time.Time{}, live...)
	if err != nil {
		t.Fatal(err)
	}
	want.Unused, want.Sessions = 2, 8
	if len(rows) != 1 || rows[0] != want {
		t.Errorf("with live data: rows %+v, want [%+v]", rows, want)
	}
}
