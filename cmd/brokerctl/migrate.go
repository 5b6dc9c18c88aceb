package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/rootcred"
	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/etcd"
	"github.com/credbroker/credbroker/store/migrate"
)

// defaultMigrateLockTimeout is how long migrate waits for the bbolt file's
// lock: a broker holds it for as long as it runs, so waiting longer only
// delays the refusal.
const defaultMigrateLockTimeout = time.Second

// migrateCmd copies a bbolt lease store into an etcd prefix (store/migrate).
// It opens both stores itself rather than asking brokerd: the bbolt file
// must not be in use, and no broker may run on the prefix yet.
func (c *cli) migrateCmd() *cobra.Command {
	var (
		from         string
		endpoints    []string
		prefix       string
		tlsFiles     etcd.TLSFiles
		username     string
		passwordFile string
		resume       bool
		lockTimeout  time.Duration
		dialTimeout  time.Duration
		configPath   string
	)
	cmd := &cobra.Command{
		Use:   "migrate --from-bbolt FILE (--config FILE | --etcd-endpoints URL[,URL...])",
		Short: "Copy a bbolt lease store into an etcd prefix, for brokers sharing one store",
		Long: `migrate copies every record of a bbolt lease store (store.path) into an etcd
prefix, for moving a broker to a group of brokers on etcd
(docs/ha.md): live leases, revoked and expired leases kept for audit
(tombstones), intents (users being created when the broker stopped), each
role's last issue time, and the group id, so the marker roles the broker
claimed stay its group's. It then reads both stores back and checks that the
prefix holds exactly the file's records, key counts and every field.

The etcd side is the store.etcd section of --config (the configuration the
brokers will run with: endpoints, prefix, tls, username and password_file),
or the --etcd-* flags and --prefix.

Stop brokerd first: migrate refuses a file a broker holds (bbolt locks it),
and no broker may use the prefix until migrate has finished. It refuses a
prefix that holds any key, unless --resume is given and the keys are this
group's, from an earlier run that was cut off.

The copy is resumable, not atomic (etcd caps a transaction at 128
operations): each record is written only if its key is absent, and a key
that already holds the same record counts as done. After an interruption run
the same command again with --resume; a key that holds anything else stops
it, naming the key. migrate changes nothing in the bbolt file but what a
brokerd start would (a group id if it had none, a schema upgrade), so until
brokers run on etcd it stays the store to go back to.`,
		Example: `  brokerctl migrate --from-bbolt /var/lib/credbroker/leases.db --config /etc/credbroker/brokerd.yaml
  brokerctl migrate --from-bbolt /var/lib/credbroker/leases.db \
      --etcd-endpoints https://10.0.0.1:2379,https://10.0.0.2:2379,https://10.0.0.3:2379 \
      --etcd-ca-file /etc/credbroker/etcd-ca.pem \
      --etcd-cert-file /etc/credbroker/etcd-client.pem --etcd-key-file /etc/credbroker/etcd-client-key.pem
  brokerctl migrate --from-bbolt leases.db --etcd-endpoints http://127.0.0.1:2379 --prefix /credbroker/ --resume`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if from == "" {
				return usageErrorf("--from-bbolt FILE is required")
			}
			if configPath != "" {
				for _, name := range []string{"etcd-endpoints", "prefix", "etcd-ca-file", "etcd-cert-file", "etcd-key-file", "etcd-username", "etcd-password-file", "dial-timeout"} {
					if cmd.Flags().Changed(name) {
						return usageErrorf("--%s and --config: the etcd side comes from one or the other", name)
					}
				}
				f, err := config.Load(configPath)
				if err != nil {
					return fmt.Errorf("--config %s: %w", configPath, err)
				}
				cfg, err := f.Validate()
				if err != nil {
					return fmt.Errorf("--config %s: %w", configPath, err)
				}
				e := cfg.Store.Etcd
				if e == nil {
					return usageErrorf("--config %s: no store.etcd section (migrate copies into the etcd store the brokers will use)", configPath)
				}
				endpoints, prefix, dialTimeout = e.Endpoints, e.Prefix, e.DialTimeout
				tlsFiles = etcd.TLSFiles{CAFile: e.TLS.CAFile, CertFile: e.TLS.CertFile, KeyFile: e.TLS.KeyFile}
				username, passwordFile = e.Username, e.PasswordFile
			}
			if len(endpoints) == 0 {
				return usageErrorf("--etcd-endpoints or --config is required")
			}
			if err := etcd.CheckPrefix(prefix); err != nil {
				return usageErrorf("--prefix: %v", err)
			}
			if (tlsFiles.CertFile == "") != (tlsFiles.KeyFile == "") {
				return usageErrorf("--etcd-cert-file and --etcd-key-file go together")
			}
			if (username == "") != (passwordFile == "") {
				return usageErrorf("--etcd-username and --etcd-password-file go together")
			}
			if lockTimeout <= 0 {
				return usageErrorf("--lock-timeout %s: must be positive", lockTimeout)
			}
			ctx := cmd.Context()

			// store.Open creates a missing file: a typo must not
			// migrate an empty store.
			fi, err := os.Stat(from)
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("--from-bbolt %s: no such file", from)
			}
			if err != nil {
				return fmt.Errorf("--from-bbolt: %w", err)
			}
			if !fi.Mode().IsRegular() {
				return fmt.Errorf("--from-bbolt %s: not a regular file", from)
			}
			var password string
			if passwordFile != "" {
				secret, warning, err := rootcred.ReadSecretFile(passwordFile)
				if err != nil {
					return fmt.Errorf("--etcd-password-file: %w", err)
				}
				if warning != "" {
					fmt.Fprintf(c.stderr, "warning: %s\n", warning)
				}
				password = secret.Reveal()
			}

			src, err := store.Open(from, store.Options{Timeout: lockTimeout})
			if errors.Is(err, store.ErrLocked) {
				return fmt.Errorf("%s is in use: %w; stop the brokerd that uses it, then run migrate again", from, err)
			}
			if err != nil {
				return err
			}
			defer src.Close()
			dst, err := etcd.Open(ctx, etcd.Options{
				Endpoints: endpoints, Prefix: prefix, DialTimeout: dialTimeout,
				TLS: tlsFiles, Username: username, Password: password,
			})
			if err != nil {
				return err
			}
			defer dst.Close()

			fmt.Fprintf(c.stderr, "copying %s to etcd prefix %s\n", from, prefix)
			rep, err := migrate.Copy(ctx, src, dst, migrate.Options{
				Resume: resume,
				Progress: func(n int) {
					fmt.Fprintf(c.stderr, "  %d leases copied\n", n)
				},
			})
			if errors.Is(err, migrate.ErrTargetNotEmpty) {
				return fmt.Errorf("etcd prefix %s: %w", prefix, err)
			}
			if err != nil {
				return fmt.Errorf("migrate %s to etcd prefix %s: %w (once the cause is fixed, run the same command with --resume)", from, prefix, err)
			}
			if c.json {
				b, err := json.MarshalIndent(map[string]any{
					"source": from, "prefix": prefix, "groupId": rep.GroupID,
					"leases": rep.Leases, "live": rep.Live, "ended": rep.Terminal,
					"intents": rep.Intents, "roles": rep.Roles,
					"writtenLeases": rep.WrittenLeases, "writtenIntents": rep.WrittenIntents,
					"verified": true,
				}, "", "  ")
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(c.stdout, "%s\n", b)
				return err
			}
			return c.printFields([][2]string{
				{"source", from},
				{"prefix", prefix},
				{"group", rep.GroupID},
				{"leases", fmt.Sprintf("%d (%d live, %d ended)", rep.Leases, rep.Live, rep.Terminal)},
				{"intents", strconv.Itoa(rep.Intents)},
				{"roles", strconv.Itoa(rep.Roles)},
				{"written", fmt.Sprintf("%d leases, %d intents (the rest were there from an earlier run)", rep.WrittenLeases, rep.WrittenIntents)},
				{"verified", "the prefix holds exactly the file's records"},
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&from, "from-bbolt", "", "the bbolt lease store file to copy (store.path); no brokerd may hold it")
	f.StringSliceVar(&endpoints, "etcd-endpoints", nil, "etcd client URLs, comma-separated (store.etcd.endpoints)")
	f.StringVar(&prefix, "prefix", etcd.DefaultPrefix, "the broker group's etcd key prefix (store.etcd.prefix)")
	f.StringVar(&tlsFiles.CAFile, "etcd-ca-file", "", "CA bundle that signed the etcd servers' certificates (store.etcd.tls.ca_file)")
	f.StringVar(&tlsFiles.CertFile, "etcd-cert-file", "", "client certificate for etcd (store.etcd.tls.cert_file)")
	f.StringVar(&tlsFiles.KeyFile, "etcd-key-file", "", "client key for etcd (store.etcd.tls.key_file)")
	f.StringVar(&username, "etcd-username", "", "etcd user (store.etcd.username)")
	f.StringVar(&passwordFile, "etcd-password-file", "", "file holding the etcd user's password (store.etcd.password_file)")
	f.BoolVar(&resume, "resume", false, "finish a copy that was cut off: allow a prefix holding this group's keys")
	f.DurationVar(&lockTimeout, "lock-timeout", defaultMigrateLockTimeout, "give up on the bbolt file's lock after this long")
	f.DurationVar(&dialTimeout, "dial-timeout", etcd.DefaultDialTimeout, "give up reaching etcd after this long (store.etcd.dial_timeout)")
	f.StringVar(&configPath, "config", "", "brokerd configuration whose store.etcd names the etcd side (instead of the --etcd-* flags)")
	return cmd
}
