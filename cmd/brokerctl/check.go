package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/privcheck"
	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
	"github.com/credbroker/credbroker/store"
)

// exitFindings is the exit status of `check` when it found problems at or
// above --severity: distinct from 1 (the check itself failed) and 2 (usage).
const exitFindings = 3

// exitError ends brokerctl with a given status and message.
type exitError struct {
	code int
	msg  string
}

func (e exitError) Error() string { return e.msg }

// checkCmd is the least-privilege check. It reads brokerd's configuration
// and connects to each target itself, as the admin role brokerd uses,
// rather than asking brokerd: it must work before brokerd first starts and
// while it is down (a pre-deployment check in CI), and it keeps catalog
// reads of the broker's own privileges out of the admin API. Only the stale
// check needs the lease history: from the store file when no brokerd holds
// it, else from the running brokerd's ListLeases at --addr.
func (c *cli) checkCmd() *cobra.Command {
	var (
		configPath string
		severity   string
		staleDays  int
	)
	cmd := &cobra.Command{
		Use:   "check --config FILE",
		Short: "Check proxy roles and the broker's admin role for least privilege",
		Long: `check connects to every target of brokerd's configuration as its admin role
and reports:

  - proxy roles that can log in, or are SUPERUSER, CREATEROLE, CREATEDB,
    BYPASSRLS or REPLICATION (themselves or through a role they belong to),
    or belong to powerful predefined roles (pg_write_server_files, ...);
  - GRANT ALL on an object, and any write privilege on a role named read-only;
  - two proxy roles with identical privileges (overlap);
  - proxy roles that do not exist or grant nothing;
  - broker roles that issued no lease for --stale-days days (from the lease
    store, or from the running brokerd at --addr when it holds the store);
  - a broker admin role that is a superuser, with the SQL for its minimal grants.

The exit status is 3 when a finding is at or above --severity, 1 when the
check could not run, 0 otherwise.`,
		Example: `  brokerctl check --config /etc/credbroker/brokerd.yaml
  brokerctl check --config brokerd.yaml --severity high --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath == "" {
				return usageErrorf("--config FILE is required")
			}
			threshold, err := privcheck.ParseSeverity(severity)
			if err != nil {
				return usageErrorf("--severity: %v", err)
			}
			if staleDays <= 0 {
				return usageErrorf("--stale-days %d: must be positive", staleDays)
			}
			f, err := config.Load(configPath)
			if err != nil {
				return fmt.Errorf("config %s: %w", configPath, err)
			}
			cfg, err := f.Validate()
			if err != nil {
				return fmt.Errorf("config %s:\n%w", configPath, err)
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()

			leases, note, closeLeases := c.leaseHistory(cfg)
			defer closeLeases()
			dbs, err := daemon.ConnectTargets(ctx, cfg, nil)
			defer func() {
				for _, db := range dbs {
					db.Close()
				}
			}()
			if err != nil {
				return err
			}
			findings, err := privcheck.Run(ctx,
				privcheck.Scope{Targets: cfg.TargetNames(), Roles: cfg.Roles, Engines: dbs},
				privcheck.Options{
					Leases:     leases,
					StaleAfter: time.Duration(staleDays) * 24 * time.Hour,
					Retention:  cfg.Store.TombstoneRetention,
				})
			if err != nil {
				return err
			}
			if note != "" {
				findings = append(findings, privcheck.Finding{
					Severity: privcheck.SeverityInfo, Check: privcheck.CheckStale, Message: note,
				})
			}
			if c.json {
				err = c.printFindingsJSON(findings, threshold)
			} else {
				err = c.printFindings(findings)
			}
			if err != nil {
				return err
			}
			n := 0
			for _, fnd := range findings {
				if fnd.Severity >= threshold {
					n++
				}
			}
			if n > 0 {
				return exitError{exitFindings, fmt.Sprintf("%d finding(s) at or above severity %s", n, threshold)}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "brokerd's configuration file (YAML)")
	cmd.Flags().StringVar(&severity, "severity", "medium", "exit 3 on findings at or above this: info, low, medium, high, critical")
	cmd.Flags().IntVar(&staleDays, "stale-days", int(privcheck.DefaultStaleAfter/(24*time.Hour)), "a broker role with no lease issued for this many days is stale")
	return cmd
}

// leaseHistory finds where the stale check reads leases: the store file
// when no brokerd holds it, else the running brokerd. note says why there
// is none.
func (c *cli) leaseHistory(cfg *config.Config) (leases privcheck.LeaseLister, note string, closeFn func()) {
	closeFn = func() {}
	if cfg.Store.Etcd != nil {
		// The group's store is shared and served: ask a brokerd of it.
		admin, err := c.admin()
		if err != nil {
			return nil, fmt.Sprintf("stale check skipped: the lease store is on etcd and brokerd is not reachable: %v", err), closeFn
		}
		return grpcLeases{admin, c.addr}, "", closeFn
	}
	if _, err := os.Stat(cfg.Store.Path); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Sprintf("stale check skipped: no lease store at %s yet", cfg.Store.Path), closeFn
	}
	st, err := store.Open(cfg.Store.Path, store.Options{Timeout: 500 * time.Millisecond})
	if err == nil {
		return st, "", func() { _ = st.Close() }
	}
	if !errors.Is(err, store.ErrLocked) {
		return nil, fmt.Sprintf("stale check skipped: %v", err), closeFn
	}
	admin, err := c.admin()
	if err != nil {
		return nil, fmt.Sprintf("stale check skipped: the store is in use and brokerd is not reachable: %v", err), closeFn
	}
	return grpcLeases{admin, c.addr}, "", closeFn
}

// grpcLeases reads lease history from a running brokerd. Page tokens are
// passed through LeaseFilter.After unchanged.
type grpcLeases struct {
	client credbrokerv1.AdminServiceClient
	addr   string
}

func (g grpcLeases) ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error) {
	resp, err := g.client.ListLeases(ctx, &credbrokerv1.ListLeasesRequest{PageSize: int32(f.Limit), PageToken: f.After})
	if err != nil {
		return nil, "", fmt.Errorf("brokerd at %s: %w", g.addr, err)
	}
	out := make([]broker.Lease, 0, len(resp.GetLeases()))
	for _, l := range resp.GetLeases() {
		out = append(out, broker.Lease{ID: l.GetId(), Role: l.GetRole(), IssueTime: l.GetIssueTime().AsTime()})
	}
	return out, resp.GetNextPageToken(), nil
}

// printFindings prints a table, then each finding's fix under its number.
func (c *cli) printFindings(findings []privcheck.Finding) error {
	if len(findings) == 0 {
		_, err := fmt.Fprintln(c.stdout, "no findings")
		return err
	}
	rows := [][]string{{"#", "SEVERITY", "TARGET", "CHECK", "ROLE", "FINDING"}}
	for i, f := range findings {
		rows = append(rows, []string{fmt.Sprint(i + 1), f.Severity.String(), f.Target, f.Check, f.Role, f.Message})
	}
	if err := c.printTable(rows); err != nil {
		return err
	}
	var b strings.Builder
	for i, f := range findings {
		if f.Fix == "" {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("\nfixes:\n")
		}
		fmt.Fprintf(&b, "#%d\n", i+1)
		for _, line := range strings.Split(f.Fix, "\n") {
			b.WriteString("    " + clean(line) + "\n")
		}
	}
	_, err := fmt.Fprint(c.stdout, b.String())
	return err
}

func (c *cli) printFindingsJSON(findings []privcheck.Finding, threshold privcheck.Severity) error {
	if findings == nil {
		findings = []privcheck.Finding{}
	}
	doc := struct {
		Severity string              `json:"severity"`
		Failed   bool                `json:"failed"`
		Findings []privcheck.Finding `json:"findings"`
	}{Severity: threshold.String(), Findings: findings}
	for _, f := range findings {
		doc.Failed = doc.Failed || f.Severity >= threshold
	}
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(doc)
}
