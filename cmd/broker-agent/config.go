package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/credbroker/credbroker/internal/buildinfo"
)

// fileConfig is broker-agent's YAML configuration file. Flags given on
// the command line override it.
type fileConfig struct {
	Broker             string            `yaml:"broker"`
	Role               string            `yaml:"role"`
	TTL                string            `yaml:"ttl"`
	Increment          string            `yaml:"increment"`
	Overlap            string            `yaml:"overlap"`
	ReplaceBefore      string            `yaml:"replace_before"`
	RotateBefore       string            `yaml:"rotate_before"` // deprecated: replace_before
	RevokeOnDisconnect bool              `yaml:"revoke_on_disconnect"`
	NoRevokeOnExit     bool              `yaml:"no_revoke_on_exit"`
	Metadata           map[string]string `yaml:"metadata"`
	Output             struct {
		Path     string `yaml:"path"`
		Format   string `yaml:"format"`
		Template string `yaml:"template"`
	} `yaml:"output"`
	Exec struct {
		Command   []string `yaml:"command"`
		OnReplace string   `yaml:"on_replace"`
		OnRotate  string   `yaml:"on_rotate"` // deprecated: on_replace
		Signal    string   `yaml:"signal"`
	} `yaml:"exec"`
	TLS struct {
		CAFile     string `yaml:"ca_file"`
		CertFile   string `yaml:"cert_file"`
		KeyFile    string `yaml:"key_file"`
		ServerName string `yaml:"server_name"`
	} `yaml:"tls"`
	TokenFile    string `yaml:"token_file"`
	HealthListen string `yaml:"health_listen"`
	LogFormat    string `yaml:"log_format"`
}

// config is the validated configuration.
type config struct {
	broker             string
	role               string
	ttl                time.Duration
	increment          time.Duration
	overlap            time.Duration
	replaceBefore      time.Duration
	revokeOnDisconnect bool
	noRevokeOnExit     bool
	metadata           map[string]string

	outPath  string
	format   string // json, env, dsn, template
	template string // path of the template file

	command   []string
	onReplace string // signal, restart, none
	signal    syscall.Signal

	tlsCA, tlsCert, tlsKey, tlsServerName string
	tokenFile                             string

	healthListen string
	logFormat    string // text, json

	// deprecated are the former spellings the configuration used, for
	// newAgent to warn about.
	deprecated []renamed
}

// renamed is a setting whose former spelling still works: "rotate" once
// also meant replacing a credential before its max TTL, and now means
// only the broker's root credential.
type renamed struct {
	oldName, newName string // "--rotate-before" or "rotate_before"
}

// renamedSetting ties a renamed setting's spellings to where fileConfig
// holds each of them, for the flags and for the file.
type renamedSetting struct {
	oldFlag, newFlag string
	oldKey, newKey   string
	flagOld, flagNew *string
	fileOld, fileNew *string
}

// renamedSettings lists the renamed settings of fc (the flags) and file.
func renamedSettings(fc, file *fileConfig) []renamedSetting {
	return []renamedSetting{
		{"rotate-before", "replace-before", "rotate_before", "replace_before",
			&fc.RotateBefore, &fc.ReplaceBefore, &file.RotateBefore, &file.ReplaceBefore},
		{"on-rotate", "on-replace", "exec.on_rotate", "exec.on_replace",
			&fc.Exec.OnRotate, &fc.Exec.OnReplace, &file.Exec.OnRotate, &file.Exec.OnReplace},
	}
}

const longHelp = `broker-agent keeps a credbroker credential alive for one application.

It issues a credential for a broker role, renders it to a file (json, env,
dsn or a Go template; written atomically with mode 0600) and/or runs the
application with it in its environment, keeps the lease alive over a
KeepAlive stream, replaces it before its max TTL (re-rendering the file and
signalling or restarting the application), and revokes it on SIGTERM.

The broker's address is --broker, else broker: in --config, else
$CREDBROKER_ADDR, else 127.0.0.1:7450. Flags given on the command line win
over the configuration file.`

// errNoRun is parseConfig's answer to --help and --version, which it has
// answered itself: there is nothing to run, and nothing went wrong.
var errNoRun = errors.New("help or version shown")

// parseConfig reads flags (and the --config file they name). --help and
// --version print to stdout and return errNoRun; any other error is a
// command line or configuration file it could not understand.
func parseConfig(args []string, stdout, stderr io.Writer) (*config, error) {
	var cfg *config
	cmd := newCommand(stdout, stderr, func(c *config) { cfg = c })
	if args == nil {
		args = []string{} // cobra reads os.Args for nil
	}
	cmd.SetArgs(args)
	if err := cmd.Execute(); err != nil {
		return nil, err
	}
	if cfg == nil {
		return nil, errNoRun
	}
	return cfg, nil
}

// newCommand is broker-agent's command line, in the style of brokerctl and
// brokerd (cobra, --long-flags, help on stdout); parsed calls got with the
// validated configuration.
func newCommand(stdout, stderr io.Writer, parsed func(*config)) *cobra.Command {
	var (
		configPath string
		fc         fileConfig
		signalName string
		metadata   []string
	)
	cmd := &cobra.Command{
		Version:       buildinfo.Read().String(),
		Use:           "broker-agent [flags] [-- command [args...]]",
		Short:         "Keep a credbroker credential alive for one application",
		Long:          longHelp,
		Args:          cobra.ArbitraryArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := buildConfig(cmd.Flags(), configPath, &fc, signalName, metadata, args)
			if err != nil {
				return err
			}
			parsed(c)
			return nil
		},
	}
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return singleDashHint(cmd.Flags(), err) })
	fs := cmd.Flags()
	// Everything after the first argument that is not a flag is the
	// command, as after "--": "broker-agent --role r /app --serve".
	fs.SetInterspersed(false)
	fs.SortFlags = false
	fs.StringVar(&configPath, "config", "", "YAML configuration `file`; flags override it")
	fs.StringVar(&fc.Broker, "broker", "", "broker gRPC `address` (default $CREDBROKER_ADDR, else 127.0.0.1:7450)")
	fs.StringVar(&fc.Role, "role", "", "broker `role` to ask a credential for (required)")
	fs.StringVar(&fc.TTL, "ttl", "", "requested lease `duration` (default: the role's)")
	fs.StringVar(&fc.Increment, "increment", "", "renewal increment, a `duration` (default: the role's default TTL)")
	fs.StringVar(&fc.Overlap, "overlap", "", "how long a replaced credential keeps working, a `duration` (default 30s)")
	fs.StringVar(&fc.ReplaceBefore, "replace-before", "", "issue the successor this long before the max TTL, a `duration` (default: derived from the overlap)")
	fs.BoolVar(&fc.RevokeOnDisconnect, "revoke-on-disconnect", false, "ask the broker to revoke the lease when this agent's stream is gone")
	fs.BoolVar(&fc.NoRevokeOnExit, "no-revoke-on-exit", false, "leave the lease to expire instead of revoking it on SIGTERM")
	fs.StringArrayVar(&metadata, "metadata", nil, "lease metadata `key=value` (repeatable)")
	fs.StringVar(&fc.Output.Path, "out", "", "write the credential to this `file`")
	fs.StringVar(&fc.Output.Format, "format", "", "file `format`: json, env, dsn or template (default json)")
	fs.StringVar(&fc.Output.Template, "template", "", "Go text/template `file` for --format template")
	fs.StringVar(&fc.Exec.OnReplace, "on-replace", "", "`action` on the command for a new credential: signal, restart or none (default signal)")
	fs.StringVar(&signalName, "signal", "", "`signal` for --on-replace signal: HUP, USR1, USR2, INT, TERM or QUIT (default HUP)")
	fs.StringVar(&fc.TLS.CAFile, "tls-ca", "", "CA certificate `file` (PEM) that signed brokerd's certificate; enables TLS")
	fs.StringVar(&fc.TLS.CertFile, "tls-cert", "", "client certificate `file` (PEM) for mutual TLS")
	fs.StringVar(&fc.TLS.KeyFile, "tls-key", "", "client private key `file` (PEM) for mutual TLS")
	fs.StringVar(&fc.TLS.ServerName, "tls-server-name", "", "`name` to verify in brokerd's certificate (default: the broker's host)")
	fs.StringVar(&fc.TokenFile, "token-file", "", "`file` holding a bearer token, read for every call (default $CREDBROKER_TOKEN_FILE)")
	fs.StringVar(&fc.HealthListen, "health-listen", "", "serve /healthz on this `address` (e.g. 127.0.0.1:8081)")
	fs.StringVar(&fc.LogFormat, "log-format", "", "log `format`: text or json (default text)")
	for _, r := range renamedSettings(&fc, &fileConfig{}) {
		fs.StringVar(r.flagOld, r.oldFlag, "", "deprecated: use --"+r.newFlag)
		// Hidden from --help; the warning is the agent's log line (see
		// newAgent), not pflag's deprecation notice, so it is said once.
		_ = fs.MarkHidden(r.oldFlag)
	}
	return cmd
}

// singleDashHint adds a hint to pflag's error for "-role", which the
// stdlib flag package that the agent once used accepted for "--role".
func singleDashHint(fs *pflag.FlagSet, err error) error {
	msg := err.Error()
	i := strings.LastIndex(msg, " in -")
	if !strings.HasPrefix(msg, "unknown shorthand flag") || i < 0 {
		return err
	}
	name, _, _ := strings.Cut(msg[i+len(" in -"):], "=")
	if fs.Lookup(name) == nil {
		return err
	}
	return fmt.Errorf("%w (long flags take two dashes: --%s)", err, name)
}

// buildConfig merges the flags that were set, the configuration file and
// the environment into a validated config; command is what followed the
// flags.
func buildConfig(fs *pflag.FlagSet, configPath string, fc *fileConfig, signalName string, metadata, command []string) (*config, error) {
	var file fileConfig
	renames := renamedSettings(fc, &file)
	if configPath != "" {
		raw, err := os.ReadFile(configPath)
		if err != nil {
			return nil, fmt.Errorf("read config: %w", err)
		}
		dec := yaml.NewDecoder(strings.NewReader(string(raw)))
		dec.KnownFields(true)
		if err := dec.Decode(&file); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("config %s: %w", configPath, err)
		}
	}
	// Flags that were set win over the file.
	set := map[string]bool{}
	fs.Visit(func(f *pflag.Flag) { set[f.Name] = true })
	// A former spelling stands for the new one, in the flags and in the
	// file alike; both spellings of one setting in one place are an error.
	var deprecated []renamed
	for _, r := range renames {
		if set[r.oldFlag] {
			if set[r.newFlag] {
				return nil, fmt.Errorf("--%s and --%s are the same setting: give only --%s", r.oldFlag, r.newFlag, r.newFlag)
			}
			*r.flagNew, set[r.newFlag] = *r.flagOld, true
			deprecated = append(deprecated, renamed{"--" + r.oldFlag, "--" + r.newFlag})
		}
		if *r.fileOld != "" {
			if *r.fileNew != "" {
				return nil, fmt.Errorf("config %s: %s and %s are the same setting: give only %s", configPath, r.oldKey, r.newKey, r.newKey)
			}
			*r.fileNew = *r.fileOld
			deprecated = append(deprecated, renamed{r.oldKey, r.newKey})
		}
	}
	pick := func(flagName, flagVal, fileVal string) string {
		if set[flagName] {
			return flagVal
		}
		return fileVal
	}
	c := &config{
		broker:             pick("broker", fc.Broker, file.Broker),
		role:               pick("role", fc.Role, file.Role),
		revokeOnDisconnect: fc.RevokeOnDisconnect || file.RevokeOnDisconnect,
		noRevokeOnExit:     fc.NoRevokeOnExit || file.NoRevokeOnExit,
		outPath:            pick("out", fc.Output.Path, file.Output.Path),
		format:             pick("format", fc.Output.Format, file.Output.Format),
		template:           pick("template", fc.Output.Template, file.Output.Template),
		onReplace:          pick("on-replace", fc.Exec.OnReplace, file.Exec.OnReplace),
		tlsCA:              pick("tls-ca", fc.TLS.CAFile, file.TLS.CAFile),
		tlsCert:            pick("tls-cert", fc.TLS.CertFile, file.TLS.CertFile),
		tlsKey:             pick("tls-key", fc.TLS.KeyFile, file.TLS.KeyFile),
		tlsServerName:      pick("tls-server-name", fc.TLS.ServerName, file.TLS.ServerName),
		tokenFile:          pick("token-file", fc.TokenFile, file.TokenFile),
		healthListen:       pick("health-listen", fc.HealthListen, file.HealthListen),
		logFormat:          pick("log-format", fc.LogFormat, file.LogFormat),
		metadata:           map[string]string{},
		deprecated:         deprecated,
	}
	for k, v := range file.Metadata {
		c.metadata[k] = v
	}
	for _, kv := range metadata {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--metadata %q: want key=value", kv)
		}
		c.metadata[k] = v
	}
	if c.broker == "" {
		c.broker = os.Getenv("CREDBROKER_ADDR")
	}
	if c.tokenFile == "" {
		c.tokenFile = os.Getenv("CREDBROKER_TOKEN_FILE")
	}
	if c.broker == "" {
		c.broker = "127.0.0.1:7450"
	}
	var err error
	for _, d := range []struct {
		key, flagName, flagVal, fileVal string
		dst                             *time.Duration
	}{
		{"ttl", "ttl", fc.TTL, file.TTL, &c.ttl},
		{"increment", "increment", fc.Increment, file.Increment, &c.increment},
		{"overlap", "overlap", fc.Overlap, file.Overlap, &c.overlap},
		{"replace_before", "replace-before", fc.ReplaceBefore, file.ReplaceBefore, &c.replaceBefore},
	} {
		v := pick(d.flagName, d.flagVal, d.fileVal)
		if v == "" {
			continue
		}
		if *d.dst, err = time.ParseDuration(v); err != nil || *d.dst < 0 {
			return nil, fmt.Errorf("%s: %q is not a non-negative duration", d.key, v)
		}
	}
	c.command = command
	if len(c.command) == 0 {
		c.command = file.Exec.Command
	}
	if !set["signal"] {
		signalName = file.Exec.Signal
	}
	return c, c.validate(signalName)
}

func (c *config) validate(signalName string) error {
	if c.role == "" {
		return errors.New("role is required (--role or role:)")
	}
	if c.outPath == "" && len(c.command) == 0 {
		return errors.New("nothing to do: give an output file (--out) or a command to run (after --)")
	}
	switch c.format {
	case "":
		c.format = "json"
	case "json", "env", "dsn":
	case "template":
		if c.template == "" {
			return errors.New("format template needs a template file (--template or output.template)")
		}
	default:
		return fmt.Errorf("format %q: want json, env, dsn or template", c.format)
	}
	if c.template != "" && c.format != "template" {
		return errors.New("a template file is only used with format template")
	}
	switch c.onReplace {
	case "":
		c.onReplace = "signal"
	case "signal", "restart", "none":
	default:
		return fmt.Errorf("on_replace %q: want signal, restart or none", c.onReplace)
	}
	c.signal = syscall.SIGHUP
	if signalName != "" {
		s, ok := signalByName(signalName)
		if !ok {
			return fmt.Errorf("signal %q: want one of HUP, USR1, USR2, INT, TERM, QUIT", signalName)
		}
		c.signal = s
	}
	switch c.logFormat {
	case "":
		c.logFormat = "text"
	case "text", "json":
	default:
		return fmt.Errorf("log_format %q: want text or json", c.logFormat)
	}
	return nil
}

func signalByName(name string) (syscall.Signal, bool) {
	n := strings.TrimPrefix(strings.ToUpper(name), "SIG")
	s, ok := map[string]syscall.Signal{
		"HUP": syscall.SIGHUP, "USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2,
		"INT": syscall.SIGINT, "TERM": syscall.SIGTERM, "QUIT": syscall.SIGQUIT,
	}[n]
	return s, ok
}
