package main

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

func (c *cli) issueCmd() *cobra.Command {
	var (
		ttl  time.Duration
		meta []string
	)
	cmd := &cobra.Command{
		Use:   "issue ROLE",
		Short: "Issue a credential for a broker role",
		Long: `Issue creates a new PostgreSQL user for ROLE and prints its lease id,
username, password, expiry and a DSN. The password is shown this once: the
broker stores it nowhere.`,
		Example: `  brokerctl issue read_only
  brokerctl issue updater --ttl 10m --meta app=billing --meta host=$(hostname)
  psql "$(brokerctl issue read_only --json | jq -r .credential.dsn)"`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if ttl < 0 {
				return usageErrorf("--ttl %s: must not be negative", ttl)
			}
			md, err := parseMeta(meta)
			if err != nil {
				return err
			}
			client, err := c.credentials()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			req := &credbrokerv1.IssueCredentialRequest{Role: args[0], Metadata: md}
			if ttl > 0 {
				req.Ttl = durationpb.New(ttl)
			}
			resp, err := client.IssueCredential(ctx, req)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			cred := resp.GetCredential()
			l := resp.GetLease()
			return c.printFields([][2]string{
				{"lease_id", l.GetId()},
				{"role", l.GetRole()},
				{"username", cred.GetUsername()},
				{"password", cred.GetPassword()},
				{"host", cred.GetHost()},
				{"port", fmt.Sprint(cred.GetPort())},
				{"database", cred.GetDatabase()},
				{"expires", formatExpiry(l.GetExpireTime().AsTime())},
				{"max_expires", formatExpiry(l.GetMaxExpireTime().AsTime())},
				{"dsn", cred.GetDsn()},
			})
		},
	}
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "lease duration (0: the role's default; above the role's max is capped)")
	cmd.Flags().StringArrayVar(&meta, "meta", nil, "metadata key=value recorded with the lease (repeatable)")
	return cmd
}

// parseMeta turns repeated --meta k=v into a map. A value may contain '=';
// the key may not be given twice.
func parseMeta(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	md := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, usageErrorf("--meta %q: want key=value", kv)
		}
		if _, dup := md[k]; dup {
			return nil, usageErrorf("--meta: key %q given twice", k)
		}
		md[k] = v
	}
	return md, nil
}

func (c *cli) renewCmd() *cobra.Command {
	var increment time.Duration
	cmd := &cobra.Command{
		Use:   "renew LEASE",
		Short: "Extend a lease (never past its max expiry)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if increment < 0 {
				return usageErrorf("--increment %s: must not be negative", increment)
			}
			client, err := c.credentials()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			req := &credbrokerv1.RenewLeaseRequest{LeaseId: args[0]}
			if increment > 0 {
				req.Increment = durationpb.New(increment)
			}
			resp, err := client.RenewLease(ctx, req)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			return c.printLease(resp.GetLease())
		},
	}
	cmd.Flags().DurationVar(&increment, "increment", 0, "extend by this much from now (0: the role's default TTL)")
	return cmd
}

func (c *cli) revokeCmd() *cobra.Command {
	var role, client string
	cmd := &cobra.Command{
		Use:   "revoke [LEASE...] [--role ROLE] [--client CLIENT]",
		Short: "Revoke leases: drop their users and end their sessions",
		Long: `Revoke drops the PostgreSQL user of each selected lease and ends its open
sessions; it returns once the users are gone.

With one LEASE and no selector it revokes that lease and prints it.
Otherwise it revokes every live lease matching all the selectors given
(lease ids, --role, --client) and prints how many it revoked. At least one
selector is required: there is no "revoke everything".`,
		Example: `  brokerctl revoke 6f3h...
  brokerctl revoke --role updater
  brokerctl revoke --client ci-runner`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 && role == "" && client == "" {
				return usageErrorf("name a lease, or select leases with --role or --client")
			}
			if len(args) == 1 && role == "" && client == "" {
				creds, err := c.credentials()
				if err != nil {
					return err
				}
				ctx, cancel := c.callContext(cmd)
				defer cancel()
				resp, err := creds.RevokeLease(ctx, &credbrokerv1.RevokeLeaseRequest{LeaseId: args[0]})
				if err != nil {
					return err
				}
				if c.json {
					return c.printJSON(resp)
				}
				return c.printLease(resp.GetLease())
			}
			admin, err := c.admin()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			resp, err := admin.RevokeLeases(ctx, &credbrokerv1.RevokeLeasesRequest{LeaseIds: args, Role: role, Client: client})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			_, err = fmt.Fprintf(c.stdout, "revoked %d lease(s)\n", resp.GetRevokedCount())
			return err
		},
	}
	cmd.Flags().StringVar(&role, "role", "", "revoke the live leases of this broker role")
	cmd.Flags().StringVar(&client, "client", "", "revoke the live leases issued to this client")
	return cmd
}

func (c *cli) lookupCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "lookup LEASE",
		Short: "Show one lease",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := c.credentials()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			resp, err := client.LookupLease(ctx, &credbrokerv1.LookupLeaseRequest{LeaseId: args[0]})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			return c.printLease(resp.GetLease())
		},
	}
}

// stateNames maps --state values to the proto enum, by the names the
// broker uses in logs (active, revoke_failed...).
var stateNames = map[string]credbrokerv1.LeaseState{
	"active":        credbrokerv1.LeaseState_LEASE_STATE_ACTIVE,
	"revoking":      credbrokerv1.LeaseState_LEASE_STATE_REVOKING,
	"revoked":       credbrokerv1.LeaseState_LEASE_STATE_REVOKED,
	"expired":       credbrokerv1.LeaseState_LEASE_STATE_EXPIRED,
	"revoke_failed": credbrokerv1.LeaseState_LEASE_STATE_REVOKE_FAILED,
}

func stateList() string {
	names := make([]string, 0, len(stateNames))
	for n := range stateNames {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, "|")
}

func (c *cli) leasesCmd() *cobra.Command {
	var (
		role, client, state, pageToken string
		pageSize                       int32
		all                            bool
	)
	cmd := &cobra.Command{
		Use:   "leases",
		Short: "List leases",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &credbrokerv1.ListLeasesRequest{Role: role, Client: client, PageSize: pageSize, PageToken: pageToken}
			if state != "" {
				s, ok := stateNames[strings.ReplaceAll(strings.ToLower(state), "-", "_")]
				if !ok {
					return usageErrorf("--state %q: want one of %s", state, stateList())
				}
				req.State = s
			}
			if pageSize < 0 {
				return usageErrorf("--page-size %d: must not be negative", pageSize)
			}
			admin, err := c.admin()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			out := &credbrokerv1.ListLeasesResponse{}
			for {
				resp, err := admin.ListLeases(ctx, req)
				if err != nil {
					return err
				}
				out.Leases = append(out.Leases, resp.GetLeases()...)
				out.NextPageToken = resp.GetNextPageToken()
				// A token that does not move would loop forever; stop on it.
				if !all || out.NextPageToken == "" || out.NextPageToken == req.PageToken {
					break
				}
				req.PageToken = out.NextPageToken
			}
			if all {
				out.NextPageToken = ""
			}
			if c.json {
				return c.printJSON(out)
			}
			if err := c.printLeaseTable(out.GetLeases()); err != nil {
				return err
			}
			if out.NextPageToken != "" {
				// On stderr, so that stdout stays a clean table.
				fmt.Fprintf(c.stderr, "more leases: rerun with --page-token %s, or --all\n", out.NextPageToken)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&role, "role", "", "only leases of this broker role")
	f.StringVar(&client, "client", "", "only leases issued to this client")
	f.StringVar(&state, "state", "", "only leases in this state ("+stateList()+")")
	f.Int32Var(&pageSize, "page-size", 0, "leases per page (0: the broker's default, 100; at most 1000)")
	f.StringVar(&pageToken, "page-token", "", "continue a listing where a previous page ended")
	f.BoolVar(&all, "all", false, "follow the pages to the end")
	return cmd
}

func (c *cli) rolesCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "roles",
		Short: "List the broker roles credentials can be issued for",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			admin, err := c.admin()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			resp, err := admin.ListRoles(ctx, &credbrokerv1.ListRolesRequest{})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			rows := [][]string{{"NAME", "TARGET", "PROXY ROLE", "DATABASE", "DEFAULT TTL", "MAX TTL"}}
			for _, r := range resp.GetRoles() {
				rows = append(rows, []string{
					r.GetName(), r.GetTarget(), r.GetProxyRole(), r.GetDatabase(),
					shortDuration(r.GetDefaultTtl().AsDuration()), shortDuration(r.GetMaxTtl().AsDuration()),
				})
			}
			return c.printTable(rows)
		},
	}
}
