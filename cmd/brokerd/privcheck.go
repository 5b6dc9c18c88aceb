package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server/config"
)

// logPrivilegeFindings runs the least-privilege check (`brokerctl check`)
// on the targets brokerd just connected to and logs what it finds, most
// severe first. Findings never stop brokerd: a DBA may have reasons, and
// the broker still only hands out its proxy roles. A check that cannot run
// is logged and skipped.
func logPrivilegeFindings(ctx context.Context, rt *config.Runtime, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	findings, err := rt.CheckPrivileges(ctx, config.DefaultStaleAfter)
	if err != nil {
		log.Warn("least-privilege check incomplete", "err", err)
	}
	for _, f := range findings {
		level := slog.LevelWarn
		if f.Severity < postgres.SeverityMedium {
			level = slog.LevelInfo
		}
		attrs := []any{"severity", f.Severity.String(), "check", f.Check, "target", f.Target, "role", f.Role}
		if f.Fix != "" {
			attrs = append(attrs, "fix", f.Fix)
		}
		log.Log(ctx, level, "least privilege: "+f.Message, attrs...)
	}
}
