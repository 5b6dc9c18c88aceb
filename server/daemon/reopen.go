package daemon

import (
	"context"
	"fmt"
	"os"
)

// ReopenAuditLog reopens the audit log at audit.path, for log rotation
// (see audit.Log.Reopen). Without audit.path it does nothing.
func (d *Daemon) ReopenAuditLog() error {
	if d.audit == nil {
		return nil
	}
	if err := d.audit.Reopen(); err != nil {
		d.log.Error("audit log not reopened", "path", d.cfg.Security.Audit.Path, "err", err)
		return fmt.Errorf("audit.path: reopen: %w", err)
	}
	d.log.Info("audit log reopened", "path", d.cfg.Security.Audit.Path)
	return nil
}

// ReopenAuditLogOn reopens the audit log each time sigs delivers a signal,
// until ctx ends. brokerd passes a channel notified of SIGHUP; a failure
// is logged and the log keeps its file.
func (d *Daemon) ReopenAuditLogOn(ctx context.Context, sigs <-chan os.Signal) {
	for {
		select {
		case <-sigs:
			_ = d.ReopenAuditLog()
		case <-ctx.Done():
			return
		}
	}
}
