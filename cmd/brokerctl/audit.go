package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/credbroker/credbroker/audit"
	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// The audit commands read brokerd's audit file directly: they work on a
// copy shipped off the host, and need no running broker.
func (c *cli) auditCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Verify brokerd's audit log and summarise role usage from it",
	}
	cmd.AddCommand(c.auditVerifyCmd(), c.auditUsageCmd())
	return cmd
}

func (c *cli) auditVerifyCmd() *cobra.Command {
	var keyFile string
	cmd := &cobra.Command{
		Use:   "verify FILE",
		Short: "Check the audit log's hash chain; report the first broken link",
		Long: `verify checks that every record of the audit log chains to the one before
it. It exits 0 for an intact log and prints the digest of its last line
(keep it elsewhere: the chain cannot vouch for the last line itself), and
exits 1 naming the first line whose link is broken: the line before it was
edited, or lines were deleted, inserted or reordered there.`,
		Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			var key []byte
			if keyFile != "" {
				k, err := readKeyFile(keyFile)
				if err != nil {
					return err
				}
				key = k
			}
			f, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer f.Close()
			res, err := audit.Verify(f, key)
			var be *audit.BreakError
			if errors.As(err, &be) {
				return fmt.Errorf("%s: chain broken at line %d: %s (%d records before it verified)", args[0], be.Line, be.Reason, res.Records)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			if c.json {
				return json.NewEncoder(c.stdout).Encode(map[string]any{
					"file": args[0], "ok": true, "records": res.Records,
					"firstSeq": res.FirstSeq, "lastSeq": res.LastSeq, "head": res.Head,
				})
			}
			fmt.Fprintf(c.stdout, "%s: ok, %d records (seq %d..%d), head %s\n", args[0], res.Records, res.FirstSeq, res.LastSeq, res.Head)
			return nil
		},
	}
	cmd.Flags().StringVar(&keyFile, "hmac-key-file", "", "the HMAC key brokerd chains with (audit.hmac_key_file)")
	return cmd
}

// readKeyFile reads an HMAC key as brokerd does: the file's content
// without its final newline.
func readKeyFile(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--hmac-key-file: %w", err)
	}
	key := strings.TrimRight(string(data), "\r\n")
	if key == "" {
		return nil, fmt.Errorf("--hmac-key-file %s is empty", path)
	}
	return []byte(key), nil
}

func (c *cli) auditUsageCmd() *cobra.Command {
	var since, until string
	var live bool
	cmd := &cobra.Command{
		Use:   "usage FILE [--since T] [--until T] [--live]",
		Short: "Count issued, used, unused, sessions, renewed, revoked, expired, denied and over-quota per role and identity",
		Long: `usage reads the audit log and counts, per broker role and identity, the
leases issued, renewed, revoked and expired (by the lease's owner) and the
requests denied or refused for a quota (by the caller).

USED and UNUSED count leases the broker's activity sampler saw connected
(a first_use record, or the usage on the lease's revoke or expire record)
or saw end never connected; UNUSED_REVOKED those revoked for it
(roles[].revoke_unused_after); SESSIONS sums the distinct sessions seen of
the used leases. A lease still live has no final record: --live asks
brokerd (--addr) for the current usage of every lease and joins it, so a
live lease never seen connected counts as unused and the sessions are
today's. Without --live such a lease counts in neither column.

--since and --until take an RFC 3339 time (2026-11-25T00:00:00Z) or a
duration back from now (24h). usage does not verify the chain: run audit
verify first.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			from, err := parseInstant("--since", since)
			if err != nil {
				return err
			}
			to, err := parseInstant("--until", until)
			if err != nil {
				return err
			}
			var leases []audit.LiveLease
			if live {
				if leases, err = c.liveLeases(cmd); err != nil {
					return fmt.Errorf("--live: %w", err)
				}
			}
			f, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer f.Close()
			rows, err := audit.Usage(f, from, to, leases...)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			if c.json {
				return json.NewEncoder(c.stdout).Encode(map[string]any{"usage": rows})
			}
			table := [][]string{{"ROLE", "IDENTITY", "ISSUED", "USED", "UNUSED", "SESSIONS", "RENEWED", "REVOKED", "UNUSED_REVOKED", "EXPIRED", "DENIED", "QUOTA"}}
			for _, r := range rows {
				table = append(table, []string{r.Role, r.Identity, strconv.Itoa(r.Issued), strconv.Itoa(r.Used),
					strconv.Itoa(r.Unused), strconv.Itoa(r.Sessions), strconv.Itoa(r.Renewed), strconv.Itoa(r.Revoked),
					strconv.Itoa(r.RevokedUnused), strconv.Itoa(r.Expired), strconv.Itoa(r.Denied), strconv.Itoa(r.Quota)})
			}
			return c.printTable(table)
		},
	}
	cmd.Flags().StringVar(&since, "since", "", "count records from this time (RFC 3339, or a duration ago such as 24h)")
	cmd.Flags().StringVar(&until, "until", "", "count records before this time (RFC 3339, or a duration ago)")
	cmd.Flags().BoolVar(&live, "live", false, "join the current usage of brokerd's leases (ListLeases over --addr)")
	return cmd
}

// liveLeases lists every lease brokerd holds (tombstones included) with
// its usage, for audit usage --live.
func (c *cli) liveLeases(cmd *cobra.Command) ([]audit.LiveLease, error) {
	admin, err := c.admin()
	if err != nil {
		return nil, err
	}
	ctx, cancel := c.callContext(cmd)
	defer cancel()
	var out []audit.LiveLease
	req := &credbrokerv1.ListLeasesRequest{PageSize: 1000}
	for {
		resp, err := admin.ListLeases(ctx, req)
		if err != nil {
			return nil, err
		}
		for _, l := range resp.GetLeases() {
			out = append(out, audit.LiveLease{
				ID: l.GetId(), Role: l.GetRole(), Identity: l.GetClient(),
				Ended: l.GetEndTime() != nil || l.GetState() == credbrokerv1.LeaseState_LEASE_STATE_EXPIRED,
				Used:  l.GetUsage().GetFirstSeenTime() != nil, SessionsSeen: int(l.GetUsage().GetSessionsSeen()),
			})
		}
		next := resp.GetNextPageToken()
		if next == "" || next == req.PageToken {
			return out, nil
		}
		req.PageToken = next
	}
}

func parseInstant(flag, v string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		return now().Add(-d), nil
	}
	return time.Time{}, usageErrorf("%s %q: want an RFC 3339 time (2026-11-25T00:00:00Z) or a duration ago (24h)", flag, v)
}
