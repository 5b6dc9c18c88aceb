package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// TestMain lets the restore scenario exec this test binary as the server,
// as it execs credbroker-bench itself in a real run.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == serveChildCmd {
		os.Exit(serveChild(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// TestSmoke runs every scenario at tiny sizes against a throwaway cluster,
// to keep the command working. It asserts that each scenario reports its
// rows, never what the figures are: they depend on the machine.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	var out, errb bytes.Buffer
	code := run(t.Context(), []string{
		"-levels", "1,2", "-phase", "150ms", "-rounds", "2",
		"-renew-concurrency", "2", "-renew-leases", "2",
		"-revoke-concurrency", "2", "-revoke-n", "20",
		"-expiry-n", "20", "-broker-revoke-rate", "1000",
		"-restore-records", "3000", "-restore-active", "300",
		"-churn-rate", "600", "-churn-duration", "1h", "-retention", "1h",
		"-pg-durable=false", "-etcd-clients", "2",
		"-failover-kills", "1", "-failover-session-ttl", "2s",
	}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	for _, want := range []string{
		"| issue c=1 ", "| issue c=2 ", "| revoke c=2 ", "| renew c=2 stream ", "| renew c=2 unary ",
		"| expiry burst N=20 ", "| restore 3000 records", "| bbolt file, ",
		"| etcd store issue c=2 ", "| etcd store renew c=2 ",
		"| etcd broker issue c=2 ", "| etcd broker renew (unary) c=2 ",
		"| failover ×1, session_ttl 2s ",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no row %q in the table:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "operations failed") {
		t.Errorf("some operations failed:\n%s", out.String())
	}
}

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"unknown scenario", []string{"-scenarios", "issue,nope"}},
		{"bad level", []string{"-levels", "1,zero"}},
		{"broker without target", []string{"-broker", "127.0.0.1:7450"}},
		{"more active than records", []string{"-restore-records", "10", "-restore-active", "11"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			if code := run(t.Context(), tc.args, &out, &errb); code != 2 {
				t.Errorf("exit %d, want 2 (stderr: %s)", code, errb.String())
			}
		})
	}
}

// TestVersion: --version names the build (package buildinfo) and exits 0.
func TestVersion(t *testing.T) {
	var out, errOut strings.Builder
	if code := run(t.Context(), []string{"--version"}, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "credbroker-bench version ") {
		t.Errorf("--version: exit %d, %q (stderr %q)", code, out.String(), errOut.String())
	}
}
