package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/postgres/pgcluster"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
)

// The demo of `brokerd dev`: the three proxy roles of the article, each on
// its own table, and a broker role for each.
const (
	devDatabase = "app"
	devAdmin    = "broker_admin"
	devListen   = config.DefaultListen
	devListenB  = "127.0.0.1:7451"
	// devVaultListen is Vault's own default address, so VAULT_ADDR
	// needs no port a Vault user would not guess.
	devVaultListen = "127.0.0.1:8200"
	devTargetName  = "main"
)

type devRole struct {
	name, proxy, grants string
	defaultTTL, maxTTL  string
	grantSQL            string
}

var devRoles = []devRole{
	{
		name: "read_only", proxy: "read_only_role", grants: "SELECT on important_table",
		defaultTTL: "15m", maxTTL: "1h",
		grantSQL: "GRANT SELECT ON important_table TO read_only_role",
	},
	{
		name: "updater", proxy: "updater_role", grants: "SELECT, INSERT, UPDATE on user_table",
		defaultTTL: "15m", maxTTL: "1h",
		grantSQL: "GRANT SELECT, INSERT, UPDATE ON user_table TO updater_role",
	},
	{
		// The privileged role gets the shortest leases: the article's
		// advice to isolate high-privilege roles.
		name: "admin", proxy: "admin_role", grants: "ALL on logs_table",
		defaultTTL: "5m", maxTTL: "15m",
		grantSQL: "GRANT ALL PRIVILEGES ON logs_table TO admin_role",
	},
}

// devSchemaSQL creates the article's demo tables with a few rows.
var devSchemaSQL = []string{
	`CREATE TABLE important_table (
		id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		name text NOT NULL UNIQUE,
		value text NOT NULL)`,
	`INSERT INTO important_table (name, value) VALUES
		('answer', '42'), ('release', '2.4.1'), ('motto', 'least privilege')`,
	`CREATE TABLE user_table (
		id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		email text NOT NULL UNIQUE,
		display_name text NOT NULL,
		created_at timestamptz NOT NULL DEFAULT now())`,
	`INSERT INTO user_table (email, display_name) VALUES
		('ada@example.com', 'Ada'), ('grace@example.com', 'Grace'), ('linus@example.com', 'Linus')`,
	`CREATE TABLE logs_table (
		id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		logged_at timestamptz NOT NULL DEFAULT now(),
		level text NOT NULL,
		message text NOT NULL)`,
	`INSERT INTO logs_table (level, message) VALUES
		('info', 'demo database created'), ('debug', 'nothing to see'), ('warn', 'this cluster is thrown away on Ctrl-C')`,
}

func devCmd(stdout, stderr io.Writer) *cobra.Command {
	var (
		listenAddr, listenB, vaultListen string
		ha                               bool
	)
	cmd := &cobra.Command{
		Use:   "dev [--listen 127.0.0.1:7450] [--vault-listen 127.0.0.1:8200] [--ha [--listen-b 127.0.0.1:7451]]",
		Short: "Try credbroker: a throwaway PostgreSQL cluster, demo proxy roles, a broker on loopback",
		Long: `dev starts a throwaway PostgreSQL cluster from this machine's PostgreSQL
binaries, creates database app with the demo tables important_table,
user_table and logs_table, the proxy roles read_only_role, updater_role and
admin_role, and the non-superuser admin broker_admin, then serves the broker
on loopback with a temporary lease store, with the Vault-compatible HTTP
API on --vault-listen, and prints how to issue a credential and log in
with psql, and how a Vault client gets one.

Ctrl-C stops the broker and the cluster and removes every temporary file.

With --ha it is a broker group instead (docs/ha.md): a three-member etcd
cluster on loopback (the etcd that make etcd builds), and two brokerd
processes, broker-a on --listen and broker-b on --listen-b, sharing one lease
store on it, and it prints how to see which one leads, kill it and watch the
other take over. Ctrl-C revokes every lease, stops both brokers, etcd and
PostgreSQL, and removes every temporary file.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if ha {
				err = runDevHA(cmd.Context(), []string{listenAddr, listenB}, devHAOptions{Stdin: os.Stdin}, stdout, stderr, nil)
			} else {
				err = runDev(cmd.Context(), listenAddr, vaultListen, stdout, stderr, nil)
			}
			if err != nil && cmd.Context().Err() != nil {
				// Ctrl-C during start-up: what failed is what was
				// interrupted, and everything has been cleaned up.
				fmt.Fprintln(stderr, "brokerd dev: interrupted; stopped and cleaned up")
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringVar(&listenAddr, "listen", devListen, "gRPC address (loopback or unix:/path; with --ha, broker-a's loopback host:port)")
	cmd.Flags().StringVar(&vaultListen, "vault-listen", devVaultListen, "address of the Vault-compatible HTTP API (loopback; \"\" for none; not with --ha)")
	cmd.Flags().BoolVar(&ha, "ha", false, "a broker group: three etcd members and two brokerd sharing one store")
	cmd.Flags().StringVar(&listenB, "listen-b", devListenB, "with --ha: broker-b's gRPC address (loopback host:port)")
	return cmd
}

// devSession is what `brokerd dev` set up; tests read it through runDev's
// ready callback.
type devSession struct {
	Dir        string // temporary directory: config, password file, store
	ConfigPath string
	Listen     string // the address served (the real port if --listen had :0)
	// VaultAddr is the Vault API's URL (http://host:port), "" without it.
	VaultAddr string
	Cluster   *pgcluster.Cluster
}

// runDev runs `brokerd dev` until ctx is done. ready, if set, is called
// once the broker serves.
func runDev(ctx context.Context, listenAddr, vaultListen string, stdout, stderr io.Writer, ready func(*devSession)) (err error) {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	// Bind first: a taken port should fail in a second, not after a
	// cluster has been initialized.
	lis, err := daemon.Listen(listenAddr, false)
	if err != nil {
		if listenAddr == devListen {
			return fmt.Errorf("%w\n(choose another address with --listen 127.0.0.1:7451)", err)
		}
		return err
	}
	defer func() {
		if lis != nil { // until daemon.Start takes it over
			lis.Close()
		}
	}()
	s := &devSession{Listen: listenAddr}
	if lis.Addr().Network() == "tcp" {
		s.Listen = lis.Addr().String()
	}
	if vaultListen != "" {
		// daemon.Start binds it; a taken port is found here, before the
		// cluster is initialized.
		probe, err := daemon.Listen(vaultListen, false)
		if err != nil {
			return fmt.Errorf("--vault-listen: %w\n(choose another address with --vault-listen 127.0.0.1:8201, or none with --vault-listen '')", err)
		}
		probe.Close()
	}

	s.Dir, err = os.MkdirTemp("", "credbroker-dev-")
	if err != nil {
		return err
	}
	defer func() {
		if rerr := os.RemoveAll(s.Dir); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()

	binDir, err := pgcluster.FindBinDir()
	if err != nil {
		return fmt.Errorf("dev needs PostgreSQL's server binaries (initdb, postgres) to start a throwaway cluster:\n%w\n"+
			"Install them with: apt-get install postgresql (Debian, Ubuntu), or set CREDBROKER_PG_BINDIR to a directory holding initdb and postgres.\n"+
			"`make dev` installs Debian's postgresql package first, then runs brokerd dev", err)
	}
	fmt.Fprintf(stderr, "brokerd dev: starting a throwaway PostgreSQL cluster (%s)...\n", binDir)
	s.Cluster, err = pgcluster.Start(ctx, pgcluster.Options{BinDir: binDir})
	if err != nil {
		return fmt.Errorf("dev: %w", err)
	}
	defer func() {
		if serr := s.Cluster.Stop(); serr != nil {
			err = errors.Join(err, fmt.Errorf("stop PostgreSQL: %w", serr))
		}
	}()

	adminPassword := rand.Text()
	if err := setUpDevDatabase(ctx, s.Cluster, adminPassword); err != nil {
		return fmt.Errorf("dev: set up database %s: %w", devDatabase, err)
	}
	if s.ConfigPath, err = writeDevConfig(s, adminPassword, vaultListen); err != nil {
		return fmt.Errorf("dev: %w", err)
	}

	// From here on `brokerd dev` is `brokerd --config` on the file it just
	// wrote: the newcomer runs the same code path as production.
	cfg, err := loadConfig(s.ConfigPath)
	if err != nil {
		return err
	}
	// ConfigPath: `brokerctl reload` re-reads the file (edit it, try it).
	d, err := daemon.Start(ctx, cfg, daemon.Options{Logger: log, Listener: lis, ConfigPath: s.ConfigPath})
	lis = nil
	if err != nil {
		return err
	}
	if a := d.VaultAPIAddr(); a != nil {
		s.VaultAddr = "http://" + a.String()
	}
	defer func() {
		revokeAll(d.Broker(), cfg, log)
		if cerr := d.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	// Serve closes Ready before it blocks, so this ends before runDev does.
	walkedThrough := make(chan struct{})
	go func() {
		defer close(walkedThrough)
		<-d.Ready()
		printWalkthrough(stdout, s)
		if ready != nil {
			ready(s)
		}
	}()
	err = d.Serve(ctx)
	<-walkedThrough
	return err
}

// setUpDevDatabase creates the demo database, tables and proxy roles as
// the superuser, then the broker's admin with the minimal grants of
// postgres.AdminSetupSQL.
func setUpDevDatabase(ctx context.Context, c *pgcluster.Cluster, adminPassword string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.SuperuserURL("postgres"))
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+devDatabase)
	conn.Close(ctx)
	if err != nil {
		return err
	}

	conn, err = pgx.Connect(ctx, c.SuperuserURL(devDatabase))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	stmts := append([]string{}, devSchemaSQL...)
	proxies := make([]string, 0, len(devRoles))
	for _, r := range devRoles {
		stmts = append(stmts, "CREATE ROLE "+r.proxy+" NOLOGIN", r.grantSQL)
		proxies = append(proxies, r.proxy)
	}
	setup, err := postgres.AdminSetupSQL(postgres.SetupParams{
		Admin:         devAdmin,
		AdminPassword: adminPassword,
		ProxyRoles:    proxies,
		ServerVersion: c.Version,
	})
	if err != nil {
		return err
	}
	stmts = append(stmts, setup...)
	for _, stmt := range stmts {
		if _, err := conn.Exec(ctx, stmt); err != nil {
			// The statements hold no password (AdminSetupSQL sends a SCRAM
			// verifier), but name only the first line of the failing one.
			first, _, _ := strings.Cut(stmt, "\n")
			return fmt.Errorf("%s: %w", first, err)
		}
	}
	return nil
}

// writeDevConfig writes the admin password (0600) and a configuration file
// into the session's directory, and returns the file's path.
func writeDevConfig(s *devSession, adminPassword, vaultListen string) (string, error) {
	pwPath := filepath.Join(s.Dir, devAdmin+".password")
	if err := os.WriteFile(pwPath, []byte(adminPassword+"\n"), 0o600); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by `brokerd dev`; removed when it stops.\n")
	fmt.Fprintf(&b, "listen: %s\n", strconv.Quote(s.Listen))
	fmt.Fprintf(&b, "store:\n  path: %s\n", strconv.Quote(filepath.Join(s.Dir, "leases.db")))
	fmt.Fprintf(&b, "targets:\n  - name: %s\n    url: %s\n    password_file: %s\n",
		devTargetName, strconv.Quote(s.Cluster.URL(devAdmin, "", devDatabase)), strconv.Quote(pwPath))
	fmt.Fprintf(&b, "roles:\n")
	for _, r := range devRoles {
		fmt.Fprintf(&b, "  - name: %s\n    target: %s\n    proxy_role: %s\n    default_ttl: %s\n    max_ttl: %s\n",
			r.name, devTargetName, r.proxy, r.defaultTTL, r.maxTTL)
	}
	// The throwaway cluster serves no TLS.
	fmt.Fprintf(&b, "dsn_sslmode: disable\n")
	// Fast enough to watch an expiry happen in a demo.
	fmt.Fprintf(&b, "reconcile_interval: 1m\n")
	if vaultListen != "" {
		fmt.Fprintf(&b, "vault_api:\n  listen: %s\n  mount: database\n", strconv.Quote(vaultListen))
	}
	path := filepath.Join(s.Dir, "credbroker.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return "", err
	}
	return path, nil
}

// revokeAll revokes every lease before the cluster goes, so that the
// shutdown shows the same revocation path an operator relies on (and open
// psql sessions are ended by the broker, not by the cluster's shutdown).
func revokeAll(b *broker.Broker, cfg *config.Config, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	total := 0
	for _, r := range cfg.Roles {
		n, err := b.RevokeLeases(ctx, broker.RevokeSelector{Role: r.Name})
		if err != nil {
			log.Warn("revoking leases at shutdown", "role", r.Name, "err", err)
		}
		total += n
	}
	if total > 0 {
		log.Info("revoked leases at shutdown", "count", total)
	}
}

// printWalkthrough tells a newcomer what runs and what to type next.
func printWalkthrough(w io.Writer, s *devSession) {
	ctl := "go run ./cmd/brokerctl"
	where := "in another terminal, from the repository (after `make build`, bin/brokerctl does the same)"
	if _, err := exec.LookPath("brokerctl"); err == nil {
		ctl, where = "brokerctl", "in another terminal"
	}
	if s.Listen != devListen {
		ctl += " --addr " + s.Listen
	}
	c := s.Cluster
	fmt.Fprintf(w, `
credbroker dev is ready.

  broker      %s (plaintext gRPC on loopback; every caller is admin)
  postgres    %s:%d, database %s (PostgreSQL %d, throwaway)
  superuser   psql %q
  config      %s

Broker roles (what clients ask for) and the proxy roles they inherit:
`, s.Listen, c.Host, c.Port, devDatabase, c.Version, c.SuperuserURL(devDatabase), s.ConfigPath)
	for _, r := range devRoles {
		fmt.Fprintf(w, "  %-10s %-15s %-38s ttl %s, max %s\n", r.name, r.proxy, r.grants, r.defaultTTL, r.maxTTL)
	}
	fmt.Fprintf(w, `
Try it %s:

  1. Issue a credential for the read-only role:
       %s issue read_only
  2. Log in with the dsn it printed:
       psql "<dsn>"
         app=> SELECT * FROM important_table;   -- allowed
         app=> SELECT * FROM user_table;        -- permission denied
  3. List the leases:
       %s leases
  4. Revoke it: the user is dropped and your psql session ends:
       %s revoke <lease_id>
  5. The other roles:
       %s issue updater
       %s issue admin --ttl 2m

`, where, ctl, ctl, ctl, ctl, ctl)
	if s.VaultAddr != "" {
		printVaultWalkthrough(w, s.VaultAddr)
	}
	fmt.Fprintf(w, `Press Ctrl-C to stop the broker and PostgreSQL and remove every temporary file.

`)
}

// devVaultToken is the token the walk-through shows: in dev (local mode)
// any token is the admin "local", as any gRPC caller is.
const devVaultToken = "dev-any-token"

// printVaultWalkthrough shows a Vault client getting a credential from
// the Vault-compatible API, unchanged but for its address.
func printVaultWalkthrough(w io.Writer, addr string) {
	fmt.Fprintf(w, `Vault clients: the Vault-compatible API is on %s (mount database;
any token is accepted here, every caller is admin):

  6. Read a credential as Vault's database engine answers it:
       curl -s -H "X-Vault-Token: %s" %s/v1/database/creds/read_only
  7. The Vault Go client, unchanged but for VAULT_ADDR (read, log in, renew, revoke):
       VAULT_ADDR=%s VAULT_TOKEN=%s go run ./examples/vault-client read_only

`, addr, devVaultToken, addr, addr, devVaultToken)
}
