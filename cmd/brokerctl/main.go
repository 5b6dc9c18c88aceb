// Command brokerctl is the admin and developer CLI of credbroker: it issues,
// renews, looks up and revokes leases, and lists leases and roles, over
// brokerd's gRPC API.
//
// Output is a human-readable table by default and one protojson document
// (lowerCamelCase field names) with --json. Errors go to stderr as
// "error: <grpc code>: <message>" and the exit status is non-zero: 1 for a
// failed call, 2 for a command line that could not be understood.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/credbroker/credbroker/internal/buildinfo"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	credbrokerv1 "github.com/credbroker/credbroker/proto/credbroker/v1"
)

const (
	defaultAddr = "127.0.0.1:7450"
	addrEnv     = "CREDBROKER_ADDR"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one brokerctl command line and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	// Cobra reports an unknown subcommand as a plain error; it is a usage
	// error all the same.
	var uerr usageError
	if errors.As(err, &uerr) || strings.HasPrefix(err.Error(), "unknown command") {
		fmt.Fprintf(stderr, "error: %v\nRun '%s --help' for usage.\n", err, cmd.CommandPath())
		return 2
	}
	var eerr exitError
	if errors.As(err, &eerr) {
		fmt.Fprintf(stderr, "%v\n", err)
		return eerr.code
	}
	printError(stderr, err)
	return 1
}

// usageError marks a command line brokerctl could not understand, which
// exits 2 rather than 1 so scripts can tell "you called me wrong" from
// "the broker said no".
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// printError prints err as "error: <grpc code>: <message>", plus a hint
// when the broker could not be reached at all.
func printError(w io.Writer, err error) {
	st, ok := status.FromError(err)
	if !ok {
		fmt.Fprintf(w, "error: %v\n", err)
		return
	}
	fmt.Fprintf(w, "error: %s: %s\n", st.Code(), st.Message())
	if st.Code() == codes.Unavailable && strings.Contains(st.Message(), "connection error") {
		fmt.Fprintf(w, "hint: is brokerd running and listening there? Set the address with --addr or %s.\n", addrEnv)
	}
}

// cli holds the global flags and the connection shared by the commands.
type cli struct {
	addr    string
	json    bool
	timeout time.Duration
	stdout  io.Writer
	stderr  io.Writer

	auth authFlags

	conn *grpc.ClientConn
}

// newRootCmd builds the whole command tree writing to stdout and stderr, so
// tests run commands in-process.
func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	c := &cli{stdout: stdout, stderr: stderr}
	addr := os.Getenv(addrEnv)
	if addr == "" {
		addr = defaultAddr
	}
	root := &cobra.Command{
		Version: buildinfo.Read().String(),
		Use:     "brokerctl",
		Short:   "Issue, inspect and revoke credbroker leases",
		Long: `brokerctl talks to brokerd over gRPC: it issues short-lived PostgreSQL
credentials, renews, looks up and revokes leases, and lists leases and roles.

The broker's address is --addr, else $` + addrEnv + `, else ` + defaultAddr + `;
unix:/path reaches a unix socket.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPostRunE: func(*cobra.Command, []string) error {
			return c.close()
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVar(&c.addr, "addr", addr, "broker address: host:port on loopback, or unix:/path (env "+addrEnv+")")
	pf.BoolVar(&c.json, "json", false, "print one protojson document instead of a table")
	pf.DurationVar(&c.timeout, "timeout", 30*time.Second, "give up on the call after this long")
	c.auth.register(root)

	root.AddCommand(
		c.issueCmd(),
		c.renewCmd(),
		c.revokeCmd(),
		c.lookupCmd(),
		c.leasesCmd(),
		c.rolesCmd(),
		tokenCmd(stdout),
		c.auditCmd(),
		c.checkCmd(),
		c.rotateRootCmd(),
		c.reloadCmd(),
		c.backupCmd(),
		c.statusCmd(),
		c.migrateCmd(),
	)
	// Cobra's own argument errors should exit 2 like flag errors do.
	for _, cmd := range root.Commands() {
		if cmd.Args != nil {
			args := cmd.Args
			cmd.Args = func(cmd *cobra.Command, a []string) error {
				if err := args(cmd, a); err != nil {
					return usageError{err}
				}
				return nil
			}
		}
	}
	return root
}

// dial connects lazily (grpc.NewClient does no I/O), so a command that
// fails on its arguments never touches the network.
func (c *cli) dial() (*grpc.ClientConn, error) {
	if c.conn != nil {
		return c.conn, nil
	}
	target, err := grpcTarget(c.addr, c.auth.tls())
	if err != nil {
		return nil, usageError{err}
	}
	opts, err := c.auth.dialOptions()
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("--addr %s: %w", c.addr, err)
	}
	c.conn = conn
	return conn, nil
}

func (c *cli) close() error {
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn = nil
	return err
}

// grpcTarget turns --addr into a gRPC target. Without TLS brokerctl
// speaks plaintext, and the broker answers with passwords, so like brokerd
// it then only talks to loopback or a unix socket; with TLS (--tls-ca) any
// address is allowed.
func grpcTarget(addr string, tls bool) (string, error) {
	if strings.HasPrefix(addr, "unix:") {
		if len(addr) == len("unix:") {
			return "", fmt.Errorf("--addr %s: a unix socket needs a path (unix:/run/credbroker/credbroker.sock)", addr)
		}
		return addr, nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("--addr %s: want host:port or unix:/path", addr)
	}
	ip := net.ParseIP(host)
	if !tls && !strings.EqualFold(host, "localhost") && (ip == nil || !ip.IsLoopback()) {
		return "", fmt.Errorf("--addr %s: without --tls-ca brokerctl speaks plaintext gRPC, which is only allowed to loopback or a unix socket (the broker answers with passwords)", addr)
	}
	// passthrough: an address, not a name for the DNS resolver to look up.
	return "passthrough:///" + addr, nil
}

func (c *cli) credentials() (credbrokerv1.CredentialServiceClient, error) {
	conn, err := c.dial()
	if err != nil {
		return nil, err
	}
	return credbrokerv1.NewCredentialServiceClient(conn), nil
}

func (c *cli) admin() (credbrokerv1.AdminServiceClient, error) {
	conn, err := c.dial()
	if err != nil {
		return nil, err
	}
	return credbrokerv1.NewAdminServiceClient(conn), nil
}

// callContext bounds one command's calls by --timeout.
func (c *cli) callContext(cmd *cobra.Command) (context.Context, context.CancelFunc) {
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	if c.timeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.timeout)
}
