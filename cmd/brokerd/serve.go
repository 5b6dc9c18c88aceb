package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
)

// loadConfig reads and validates a configuration file. Its error lists
// every problem, one per line, each with its key path.
func loadConfig(path string) (*config.Config, error) {
	f, err := config.Load(path)
	if err != nil {
		return nil, fmt.Errorf("config %s:\n%w", path, err)
	}
	cfg, err := f.Validate()
	if err != nil {
		return nil, fmt.Errorf("config %s:\n%w", path, err)
	}
	return cfg, nil
}

// runServer is `brokerd run`: the configuration file, started and served
// through package daemon until ctx is done.
func runServer(ctx context.Context, configPath string, stderr io.Writer) error {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return err
	}
	logger, level := cfg.Log.NewLevelLogger(stderr)
	d, err := daemon.Start(ctx, cfg, daemon.Options{Logger: logger, LogLevel: level, ConfigPath: configPath})
	if err != nil {
		return err
	}
	defer d.Close()
	// SIGHUP reloads the configuration and reopens the audit log, for log
	// rotation (docs/operations.md, docs/security.md).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	hupCtx, stopHUP := context.WithCancel(ctx)
	defer stopHUP()
	go d.HandleHUP(hupCtx, hup)
	return d.Serve(ctx)
}

func checkCmd(stdout, stderr io.Writer) *cobra.Command {
	var (
		configPath string
		connect    bool
	)
	cmd := &cobra.Command{
		Use:   "check --config FILE [--connect]",
		Short: "Validate a configuration file (and, with --connect, its targets and proxy roles)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath == "" {
				return usageError{errors.New("--config FILE is required")}
			}
			cfg, err := loadConfig(configPath)
			if err != nil {
				return err
			}
			// The store is left alone: a running brokerd holds it
			// locked, and checking before a restart is the point.
			warnings, err := daemon.Check(cmd.Context(), cfg, connect, cfg.Log.NewLogger(stderr))
			for _, w := range append(cfg.Warnings, warnings...) {
				fmt.Fprintf(stderr, "warning: %s\n", w)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "%s: ok (%d target(s), %d role(s))\n", configPath, len(cfg.Targets), len(cfg.Roles))
			return nil
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "configuration file (YAML)")
	cmd.Flags().BoolVar(&connect, "connect", false, "also connect to every target and check every role's proxy role")
	return cmd
}
