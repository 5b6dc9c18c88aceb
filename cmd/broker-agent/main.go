// Command broker-agent is credbroker's sidecar. It issues a credential for
// one broker role, renders it to a file and/or runs the application with
// it in its environment, keeps the lease alive over a KeepAlive stream
// (reconnecting when the broker restarts), replaces it before its max TTL
// or when it is revoked (re-rendering the file, and signalling or
// restarting the application), and revokes it on SIGTERM unless told not
// to. It logs what it does, never a password, and serves /healthz.
//
// Exit status: the child's in exec mode (128+n when a signal ended it);
// otherwise 0 after SIGTERM/SIGINT; 1 when it could not start or the
// broker refused it for good (an unknown role, a revoked token: errors
// that retrying cannot change are not retried); 2 for a command line or
// configuration it could not understand.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGQUIT)
	os.Exit(run(context.Background(), os.Args[1:], sigs, os.Stdout, os.Stderr))
}

// run is main without the process: tests call it. --help and --version
// print to stdout; everything else goes to stderr.
func run(ctx context.Context, args []string, sigs <-chan os.Signal, stdout, stderr io.Writer) int {
	cfg, err := parseConfig(args, stdout, stderr)
	if errors.Is(err, errNoRun) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "broker-agent: %v\nRun 'broker-agent --help' for usage.\n", err)
		return 2
	}
	a, err := newAgent(cfg, newLogger(cfg, stderr))
	if err != nil {
		fmt.Fprintf(stderr, "broker-agent: %v\n", err)
		return 1
	}
	return a.run(ctx, sigs)
}

func newLogger(cfg *config, w io.Writer) *slog.Logger {
	if cfg.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, nil))
	}
	return slog.New(slog.NewTextHandler(w, nil))
}
