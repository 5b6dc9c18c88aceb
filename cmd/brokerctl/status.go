package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

func (c *cli) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the broker group: its instances, which one leads and since when",
		Long: `status asks brokerd for its broker group: every live instance (name, gRPC
address, version, start time) and which one leads, that is runs expiry,
reconciliation, disconnect revocations, the tombstone purge and root
rotation, and since when. On a bbolt store the group is the one brokerd,
which always leads; on etcd it is every brokerd sharing the prefix. Any
instance answers.`,
		Example: `  brokerctl status
  brokerctl --json status`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client, err := c.admin()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			resp, err := client.GetStatus(ctx, &credbrokerv1.GetStatusRequest{})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			leader := resp.GetLeader()
			if leader == "" {
				leader = "none (an election is under way)"
			} else if resp.GetLeaderSince() == nil {
				leader += " (taking over)"
			} else {
				leader += " since " + formatTime(resp.GetLeaderSince()) + " (for " + shortDuration(now().Sub(resp.GetLeaderSince().AsTime()).Round(time.Second)) + ")"
			}
			if err := c.printFields([][2]string{
				{"store", resp.GetStore()},
				{"leader", leader},
				{"answered_by", resp.GetAnsweredBy()},
			}); err != nil {
				return err
			}
			fmt.Fprintln(c.stdout)
			rows := [][]string{{"INSTANCE", "ADDRESS", "VERSION", "STARTED", "ROLE"}}
			for _, in := range resp.GetInstances() {
				role := "follower"
				if in.GetLeader() {
					role = "leader"
				}
				rows = append(rows, []string{in.GetName(), in.GetAddress(), in.GetVersion(), formatTime(in.GetStartTime()), role})
			}
			return c.printTable(rows)
		},
	}
}
