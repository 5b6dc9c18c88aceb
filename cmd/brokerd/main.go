// Command brokerd is the credbroker server: it issues short-lived
// PostgreSQL users over gRPC and drops them when their leases end.
//
//	brokerd --config FILE      serve (also: brokerd run --config FILE)
//	brokerd check --config FILE [--connect]
//	brokerd dev [--listen ADDR] a throwaway PostgreSQL cluster with demo roles
//
// Without tls and tokens in its configuration, brokerd serves plaintext gRPC
// on loopback or a unix socket only, and every caller is trusted as admin
// (server.LocalAuthenticator), which is only sound where the caller is a
// process on this machine. With them, callers are authenticated (client
// certificates, bearer tokens) and authorized per role; see
// docs/security.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/credbroker/credbroker/internal/buildinfo"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal, restore the default behaviour so that a
		// second Ctrl-C kills a shutdown that hangs.
		<-ctx.Done()
		stop()
	}()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one brokerd command line and returns the exit status: 0,
// 1 when serving failed, 2 for a command line it could not understand.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	var uerr usageError
	if errors.As(err, &uerr) || strings.HasPrefix(err.Error(), "unknown command") {
		fmt.Fprintf(stderr, "brokerd: %v\nRun '%s --help' for usage.\n", err, cmd.CommandPath())
		return 2
	}
	fmt.Fprintf(stderr, "brokerd: %s\n", indentLines(err.Error()))
	return 1
}

// usageError marks a command line brokerd could not understand.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// indentLines indents the lines after the first, so the joined errors of
// a configuration read as one list under their heading.
func indentLines(s string) string {
	return strings.ReplaceAll(s, "\n", "\n  ")
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	var configPath string
	root := &cobra.Command{
		Version: buildinfo.Read().String(),
		Use:     "brokerd --config FILE",
		Short:   "Serve credbroker: short-lived PostgreSQL users over gRPC",
		Long: `brokerd issues short-lived PostgreSQL users for broker roles, records them as
leases, and drops them (ending their sessions) when a lease expires or is
revoked.

  brokerd --config FILE         serve (same as: brokerd run --config FILE)
  brokerd check --config FILE   validate a configuration file
  brokerd dev                   try it out: a throwaway PostgreSQL with demo roles`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath == "" {
				return usageError{errors.New("--config FILE is required (or try: brokerd dev)")}
			}
			return runServer(cmd.Context(), configPath, stderr)
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.Flags().StringVar(&configPath, "config", "", "configuration file (YAML)")

	root.AddCommand(runCmd(stderr), checkCmd(stdout, stderr), devCmd(stdout, stderr))
	for _, cmd := range append(root.Commands(), root) {
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

func runCmd(stderr io.Writer) *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "run --config FILE",
		Short: "Serve with a configuration file (same as brokerd --config FILE)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath == "" {
				return usageError{errors.New("--config FILE is required")}
			}
			return runServer(cmd.Context(), configPath, stderr)
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "configuration file (YAML)")
	return cmd
}
