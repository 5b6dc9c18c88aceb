package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

func (c *cli) reloadCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "reload",
		Short: "Make brokerd re-read its configuration file (as SIGHUP does)",
		Long: `reload asks brokerd to re-read its configuration file and apply it without a
restart and without ending a stream: roles (added, removed, TTLs, allowed),
admins, tokens, quotas, log level, expiry settings and target password
sources; the audit log is reopened. It prints what changed, one key per line.

A file that is invalid, or that changes a key needing a restart (listen,
store, a target's url, tls, metrics, audit.path, ...), changes nothing: the
error names every key, and brokerd counts it in
credbroker_config_reload_failures_total and shows it in /readyz.`,
		Example: `  brokerctl reload`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client, err := c.admin()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			resp, err := client.ReloadConfig(ctx, &credbrokerv1.ReloadConfigRequest{})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(resp)
			}
			if len(resp.GetChanges()) == 0 {
				_, err = fmt.Fprintf(c.stdout, "%s: reloaded, nothing changed\n", resp.GetConfigFile())
				return err
			}
			if _, err := fmt.Fprintf(c.stdout, "%s: reloaded\n", resp.GetConfigFile()); err != nil {
				return err
			}
			for _, ch := range resp.GetChanges() {
				if _, err := fmt.Fprintf(c.stdout, "  %s\n", ch); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

func (c *cli) backupCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "backup FILE",
		Short: "Write a consistent snapshot of brokerd's lease store to FILE",
		Long: `backup streams a consistent snapshot of the lease store from a running
brokerd (bbolt: a database file; etcd: an export of the group's prefix) and
writes it to FILE atomically, with mode 0600: a temporary file beside FILE,
synced, then renamed over it. FILE holds lease records (usernames, clients,
metadata), never a password. docs/operations.md says how to restore it.

A large store may need a longer --timeout than the default.`,
		Example: `  brokerctl backup /var/backups/credbroker/leases-$(date +%F).db`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := c.admin()
			if err != nil {
				return err
			}
			ctx, cancel := c.callContext(cmd)
			defer cancel()
			stream, err := client.BackupStore(ctx, &credbrokerv1.BackupStoreRequest{})
			if err != nil {
				return err
			}
			path := args[0]
			tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
			if err != nil {
				return err
			}
			done := false
			defer func() {
				if !done {
					_ = tmp.Close()
					_ = os.Remove(tmp.Name())
				}
			}()
			var format string
			var written, size int64
			for {
				msg, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					return err
				}
				if msg.GetFormat() != "" {
					format = msg.GetFormat()
				}
				if msg.GetSize() != 0 {
					size = msg.GetSize()
				}
				n, err := tmp.Write(msg.GetData())
				written += int64(n)
				if err != nil {
					return err
				}
			}
			if written != size {
				return fmt.Errorf("backup: received %d bytes, brokerd sent %d; %s not written", written, size, path)
			}
			// CreateTemp makes the file 0600; say so in case a umask or
			// an ACL had a say.
			if err := tmp.Chmod(0o600); err != nil {
				return err
			}
			if err := tmp.Sync(); err != nil {
				return err
			}
			if err := tmp.Close(); err != nil {
				return err
			}
			if err := os.Rename(tmp.Name(), path); err != nil {
				return err
			}
			done = true
			if dir, err := os.Open(filepath.Dir(path)); err == nil {
				_ = dir.Sync()
				_ = dir.Close()
			}
			if c.json {
				return c.printJSON(&credbrokerv1.BackupStoreResponse{Format: format, Size: written})
			}
			return c.printFields([][2]string{
				{"file", path},
				{"format", format},
				{"bytes", fmt.Sprint(written)},
			})
		},
	}
}
