package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/pgtest"
)

// A signal on the channel brokerd notifies of SIGHUP reopens the audit
// log: after the file is moved away, records go to a new file at
// audit.path, which starts with a "reopened" record.
func TestReopenAuditLogOnSignal(t *testing.T) {
	tg := pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	cfg := targetConfig(t, tg, tg.AdminPassword, [][2]string{{"read_only", tg.ProxyRoles["read_only"]}},
		"audit:\n  path: "+auditPath+"\n")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := Start(ctx, cfg, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, _, err := d.Broker().Issue(ctx, broker.IssueRequest{Role: "read_only", Client: "test"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(auditPath, auditPath+".1"); err != nil {
		t.Fatal(err)
	}

	sigs := make(chan os.Signal) // unbuffered: a send returns once the loop has taken it
	done := make(chan struct{})
	hupCtx, stop := context.WithCancel(ctx)
	go func() {
		defer close(done)
		d.ReopenAuditLogOn(hupCtx, sigs)
	}()
	sigs <- syscall.SIGHUP
	sigs <- syscall.SIGHUP // taken only after the first reopen has finished
	stop()
	<-done

	old, err := os.ReadFile(auditPath + ".1")
	if err != nil {
		t.Fatal(err)
	}
	oldRes, err := audit.Verify(strings.NewReader(string(old)), nil)
	if err != nil || oldRes.Records == 0 {
		t.Fatalf("rotated file: %+v, %v", oldRes, err)
	}
	cur, err := os.ReadFile(auditPath)
	if err != nil {
		t.Fatalf("no new audit file after the signal: %v", err)
	}
	res, err := audit.Verify(strings.NewReader(string(cur)), nil)
	if err != nil || res.Records != 2 || res.FirstSeq != oldRes.LastSeq+1 {
		t.Fatalf("new file: %+v, %v; want 2 reopened records from seq %d", res, err, oldRes.LastSeq+1)
	}
	if !strings.Contains(string(cur), `"event":"reopened"`) || !strings.Contains(string(cur), oldRes.Head) {
		t.Errorf("new file does not name where the old one ended (%s):\n%s", oldRes.Head, cur)
	}
}
