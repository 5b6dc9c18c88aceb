package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/server"
)

// runCLI runs one brokerctl command line in-process with stdin.
func runCLI(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	root := newRootCmd(&out, &errb)
	root.SetIn(strings.NewReader(stdin))
	root.SetArgs(args)
	// The same exit-code logic as run, with stdin set.
	_, err := root.ExecuteContextC(context.Background())
	if err != nil {
		var code int
		if _, ok := err.(usageError); ok {
			code = 2
		} else {
			code = 1
		}
		printError(&errb, err)
		return code, out.String(), errb.String()
	}
	return 0, out.String(), errb.String()
}

func writeAuditLog(t *testing.T, key []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, audit.Options{HMACKey: key})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)
	l.AuditLease(broker.AuditEvent{Time: t0, Action: broker.AuditIssue, Role: "read_only", Client: "svc-a"})
	l.AuditLease(broker.AuditEvent{Time: t0.Add(time.Minute), Action: broker.AuditRenew, Role: "read_only", Client: "svc-a"})
	l.Record(audit.Record{Time: t0.Add(2 * time.Minute), Event: audit.EventRequest, Role: "updater", Identity: "svc-a", Outcome: audit.OutcomeDenied})
	l.AuditLease(broker.AuditEvent{Time: t0.Add(3 * time.Minute), Action: broker.AuditRevoke, Role: "read_only", Client: "svc-a"})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestAuditVerifyCommand(t *testing.T) {
	path := writeAuditLog(t, nil)
	code, out, errOut := runCLI(t, "", "audit", "verify", path)
	if code != 0 || !strings.Contains(out, "ok, 4 records (seq 1..4)") {
		t.Fatalf("verify intact log: code %d, out %q, err %q", code, out, errOut)
	}

	data, _ := os.ReadFile(path)
	lines := strings.SplitAfter(string(data), "\n")
	// Delete the second record.
	tampered := filepath.Join(t.TempDir(), "tampered.log")
	os.WriteFile(tampered, []byte(lines[0]+strings.Join(lines[2:], "")), 0o600)
	code, _, errOut = runCLI(t, "", "audit", "verify", tampered)
	if code != 1 || !strings.Contains(errOut, "chain broken at line 2") {
		t.Errorf("verify after deleting line 2: code %d, stderr %q", code, errOut)
	}
}

func TestAuditVerifyCommandWithHMAC(t *testing.T) {
	key := []byte("an audit key of thirty-two bytes")
	path := writeAuditLog(t, key)
	keyFile := filepath.Join(t.TempDir(), "key")
	os.WriteFile(keyFile, append(key, '\n'), 0o600)
	if code, out, errOut := runCLI(t, "", "audit", "verify", "--hmac-key-file", keyFile, path); code != 0 {
		t.Fatalf("verify with key: code %d, out %q, err %q", code, out, errOut)
	}
	if code, _, errOut := runCLI(t, "", "audit", "verify", path); code != 1 || !strings.Contains(errOut, "--hmac-key-file") {
		t.Errorf("verify without key: code %d, stderr %q", code, errOut)
	}
}

func TestAuditUsageCommand(t *testing.T) {
	path := writeAuditLog(t, nil)
	code, out, errOut := runCLI(t, "", "audit", "usage", path, "--since", "2026-11-25T00:00:00Z", "--until", "2026-11-26T00:00:00Z")
	if code != 0 {
		t.Fatalf("usage: code %d, err %q", code, errOut)
	}
	want := [][]string{
		{"ROLE", "IDENTITY", "ISSUED", "USED", "UNUSED", "SESSIONS", "RENEWED", "REVOKED", "UNUSED_REVOKED", "EXPIRED", "DENIED", "QUOTA"},
		{"read_only", "svc-a", "1", "0", "0", "0", "1", "1", "0", "0", "0", "0"},
		{"updater", "svc-a", "0", "0", "0", "0", "0", "0", "0", "0", "1", "0"},
	}
	if got := tableRows(out); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("usage table\n got %q\nwant %q", got, want)
	}
	// A range that holds nothing.
	code, out, _ = runCLI(t, "", "audit", "usage", path, "--until", "2026-11-25T00:00:00Z")
	if code != 0 || strings.Contains(out, "svc-a") {
		t.Errorf("usage before any record: code %d, out %q", code, out)
	}
	if code, _, _ := runCLI(t, "", "audit", "usage", path, "--since", "yesterday"); code != 2 {
		t.Errorf("--since yesterday: code %d, want 2", code)
	}
}

func TestTokenHashCommand(t *testing.T) {
	code, out, errOut := runCLI(t, "s3cr3t-token\n", "token", "hash")
	if code != 0 || strings.TrimSpace(out) != server.TokenHash("s3cr3t-token") {
		t.Fatalf("token hash: code %d, out %q, err %q", code, out, errOut)
	}
	if code, _, _ := runCLI(t, "", "token", "hash"); code == 0 {
		t.Error("token hash of empty stdin succeeded")
	}
	code, out, _ = runCLI(t, "", "token", "new")
	var tok, sum string
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "token:  "); ok {
			tok = v
		}
		if v, ok := strings.CutPrefix(line, "sha256: "); ok {
			sum = v
		}
	}
	if code != 0 || len(tok) < 40 || sum != server.TokenHash(tok) {
		t.Errorf("token new: code %d, out %q", code, out)
	}
}
