package main

import (
	"github.com/spf13/cobra"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

func (c *cli) rotateRootCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rotate-root TARGET",
		Short: "Give the broker's own admin role on TARGET a new password",
		Long: `rotate-root asks brokerd to set a new random password for its admin role on
TARGET and to store it where that password comes from (the target's
password_file or Vault KV secret). The new password is recorded as pending
before PostgreSQL gets it, so a crash at any point leaves a password that
works: brokerd settles it at its next start. The password is never shown.

A target whose password comes from an environment variable cannot be
rotated this way (FailedPrecondition).`,
		Example: `  brokerctl rotate-root main`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := c.admin()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			resp, err := client.RotateRootCredential(ctx, &credbrokerv1.RotateRootCredentialRequest{Target: args[0]})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			return c.printFields([][2]string{
				{"target", resp.GetTarget()},
				{"stored_in", resp.GetSource()},
				{"rotated", formatTime(resp.GetRotateTime())},
			})
		},
	}
}
