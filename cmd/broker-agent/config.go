package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"
)

// fileConfig is broker-agent's YAML configuration file. Flags given on
// the command line override it.
type fileConfig struct {
	Broker             string            `yaml:"broker"`
	Role               string            `yaml:"role"`
	TTL                string            `yaml:"ttl"`
	Increment          string            `yaml:"increment"`
	Overlap            string            `yaml:"overlap"`
	RotateBefore       string            `yaml:"rotate_before"`
	RevokeOnDisconnect bool              `yaml:"revoke_on_disconnect"`
	NoRevokeOnExit     bool              `yaml:"no_revoke_on_exit"`
	Metadata           map[string]string `yaml:"metadata"`
	Output             struct {
		Path     string `yaml:"path"`
		Format   string `yaml:"format"`
		Template string `yaml:"template"`
	} `yaml:"output"`
	Exec struct {
		Command  []string `yaml:"command"`
		OnRotate string   `yaml:"on_rotate"`
		Signal   string   `yaml:"signal"`
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
	rotateBefore       time.Duration
	revokeOnDisconnect bool
	noRevokeOnExit     bool
	metadata           map[string]string

	outPath  string
	format   string // json, env, dsn, template
	template string // path of the template file

	command  []string
	onRotate string // signal, restart, none
	signal   syscall.Signal

	tlsCA, tlsCert, tlsKey, tlsServerName string
	tokenFile                             string

	healthListen string
	logFormat    string // text, json
}

const usageText = `broker-agent keeps a credbroker credential alive for one application.

It issues a credential for a broker role, renders it to a file (json, env,
dsn or a Go template; written atomically with mode 0600) and/or runs the
application with it in its environment, keeps the lease alive over a
KeepAlive stream, replaces it before its max TTL (re-rendering the file and
signalling or restarting the application), and revokes it on SIGTERM.

Usage:
  broker-agent [flags] [-- command [args...]]

Flags:
`

// parseConfig reads flags (and the --config file they name).
func parseConfig(args []string, stderr io.Writer) (*config, error) {
	fs := flag.NewFlagSet("broker-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usageText)
		fs.PrintDefaults()
	}
	var (
		configPath = fs.String("config", "", "YAML configuration `file`; flags override it")
		fc         fileConfig
		signalName string
	)
	fs.StringVar(&fc.Broker, "broker", "", "broker gRPC `address` (default 127.0.0.1:7450, or $CREDBROKER_ADDR)")
	fs.StringVar(&fc.Role, "role", "", "broker `role` to ask a credential for (required)")
	fs.StringVar(&fc.TTL, "ttl", "", "requested lease `duration` (default: the role's)")
	fs.StringVar(&fc.Increment, "increment", "", "renewal increment (default: the role's default TTL)")
	fs.StringVar(&fc.Overlap, "overlap", "", "how long a rotated-out credential keeps working (default 30s)")
	fs.StringVar(&fc.RotateBefore, "rotate-before", "", "issue the successor this long before the max TTL (default: derived from the overlap)")
	fs.BoolVar(&fc.RevokeOnDisconnect, "revoke-on-disconnect", false, "ask the broker to revoke the lease when this agent's stream is gone")
	fs.BoolVar(&fc.NoRevokeOnExit, "no-revoke-on-exit", false, "leave the lease to expire instead of revoking it on SIGTERM")
	fs.StringVar(&fc.Output.Path, "out", "", "write the credential to this `file`")
	fs.StringVar(&fc.Output.Format, "format", "", "file format: json, env, dsn or template (default json)")
	fs.StringVar(&fc.Output.Template, "template", "", "Go text/template `file` for --format template")
	fs.StringVar(&fc.Exec.OnRotate, "on-rotate", "", "what to do to the child on a new credential: signal, restart or none (default signal)")
	fs.StringVar(&signalName, "signal", "", "signal for --on-rotate signal (default SIGHUP)")
	fs.StringVar(&fc.TLS.CAFile, "tls-ca", "", "CA certificate (PEM) that signed brokerd's certificate; enables TLS")
	fs.StringVar(&fc.TLS.CertFile, "tls-cert", "", "client certificate (PEM) for mutual TLS")
	fs.StringVar(&fc.TLS.KeyFile, "tls-key", "", "client private key (PEM) for mutual TLS")
	fs.StringVar(&fc.TLS.ServerName, "tls-server-name", "", "name to verify in brokerd's certificate (default: the broker's host)")
	fs.StringVar(&fc.TokenFile, "token-file", "", "`file` holding a bearer token, read for every call (or $CREDBROKER_TOKEN_FILE)")
	fs.StringVar(&fc.HealthListen, "health-listen", "", "serve /healthz on this `address` (e.g. 127.0.0.1:8081)")
	fs.StringVar(&fc.LogFormat, "log-format", "", "text or json (default text)")
	var metadata multiFlag
	fs.Var(&metadata, "metadata", "lease metadata `key=value` (repeatable)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}

	var file fileConfig
	if *configPath != "" {
		raw, err := os.ReadFile(*configPath)
		if err != nil {
			return nil, fmt.Errorf("read config: %w", err)
		}
		dec := yaml.NewDecoder(strings.NewReader(string(raw)))
		dec.KnownFields(true)
		if err := dec.Decode(&file); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("config %s: %w", *configPath, err)
		}
	}
	// Flags that were set win over the file.
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
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
		onRotate:           pick("on-rotate", fc.Exec.OnRotate, file.Exec.OnRotate),
		tlsCA:              pick("tls-ca", fc.TLS.CAFile, file.TLS.CAFile),
		tlsCert:            pick("tls-cert", fc.TLS.CertFile, file.TLS.CertFile),
		tlsKey:             pick("tls-key", fc.TLS.KeyFile, file.TLS.KeyFile),
		tlsServerName:      pick("tls-server-name", fc.TLS.ServerName, file.TLS.ServerName),
		tokenFile:          pick("token-file", fc.TokenFile, file.TokenFile),
		healthListen:       pick("health-listen", fc.HealthListen, file.HealthListen),
		logFormat:          pick("log-format", fc.LogFormat, file.LogFormat),
		metadata:           map[string]string{},
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
		{"rotate_before", "rotate-before", fc.RotateBefore, file.RotateBefore, &c.rotateBefore},
	} {
		v := pick(d.flagName, d.flagVal, d.fileVal)
		if v == "" {
			continue
		}
		if *d.dst, err = time.ParseDuration(v); err != nil || *d.dst < 0 {
			return nil, fmt.Errorf("%s: %q is not a non-negative duration", d.key, v)
		}
	}
	c.command = fs.Args()
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
	switch c.onRotate {
	case "":
		c.onRotate = "signal"
	case "signal", "restart", "none":
	default:
		return fmt.Errorf("on_rotate %q: want signal, restart or none", c.onRotate)
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

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
