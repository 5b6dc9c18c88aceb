// Command credbroker-bench measures credbroker against the PostgreSQL
// ceiling. Every scenario runs twice in the same process and the same
// minute: through the broker (gRPC, store, engine) and as the same SQL sent
// straight to PostgreSQL through pgx at the same concurrency, the baseline;
// every figure is printed with its ratio to that baseline, because on a
// shared machine only ratios measured side by side mean anything.
//
// By default it starts a throwaway PostgreSQL cluster (package pgcluster,
// fsync on) and an in-process broker served over a loopback gRPC listener
// (real bbolt file with fsync, real gRPC client). --pg-url and --broker
// point it at existing ones instead. See docs/benchmarks-usage.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/credbroker/credbroker/internal/buildinfo"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/store/etcd"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == serveChildCmd {
		os.Exit(serveChild(os.Args[2:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

var allScenarios = []string{"issue", "renew", "revoke", "streams", "expiry", "restore", "churn", "etcd-store", "etcd", "failover"}

type options struct {
	scenarios []string
	levels    []int
	phase     time.Duration
	rounds    int

	renewConc, renewPerWorker int
	revokeConc, revokeN       int
	expiryN                   int
	poll                      time.Duration

	restoreRecords, restoreActive int
	brokerd                       string

	churnRate  float64
	churnTTL   time.Duration
	churnHours time.Duration
	retention  time.Duration

	maxConns         int
	scramIterations  int
	brokerRevokeConc int
	brokerRevokeRate float64

	pgURL, pgPasswordFile string
	brokerAddr            string
	role, proxyRole       string
	markerRole            string
	pgDurable             bool

	etcdBin          string
	etcdClients      int
	failoverKills    int
	failoverExpiring int
	failoverTTL      time.Duration

	// pin is --pin's value, a key of pinModes.
	pin string

	streams       int
	streamsTTL    time.Duration
	streamsWindow time.Duration
	streamsConns  int

	profileDir string
	verbose    bool
	pgConf     map[string]string
	keepLog    bool
}

func (o *options) maxLevel() int { return slices.Max(o.levels) }

func (o *options) has(s string) bool { return slices.Contains(o.scenarios, s) }

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("credbroker-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	scen := fs.String("scenarios", strings.Join(allScenarios, ","), "scenarios to run, comma-separated: "+strings.Join(allScenarios, ","))
	levels := fs.String("levels", "1,4,16,64", "issue: client concurrency levels")
	fs.DurationVar(&o.phase, "phase", 1500*time.Millisecond, "length of one timed phase (issue, renew)")
	fs.IntVar(&o.rounds, "rounds", 3, "phases per side, alternating broker and baseline")
	fs.IntVar(&o.renewConc, "renew-concurrency", 16, "renew: concurrent clients (and streams)")
	fs.IntVar(&o.renewPerWorker, "renew-leases", 4, "renew: leases per client")
	fs.IntVar(&o.revokeConc, "revoke-concurrency", 16, "revoke: concurrent clients")
	fs.IntVar(&o.revokeN, "revoke-n", 1000, "revoke: revocations per side")
	fs.IntVar(&o.expiryN, "expiry-n", 10_000, "expiry: leases expiring at the same instant")
	fs.DurationVar(&o.poll, "poll", 20*time.Millisecond, "expiry: how often pg_roles is polled for dropped users")
	fs.IntVar(&o.restoreRecords, "restore-records", 1_000_000, "restore: lease records in the synthetic store")
	fs.IntVar(&o.restoreActive, "restore-active", 100_000, "restore: how many of them are active (the rest are tombstones)")
	fs.StringVar(&o.brokerd, "brokerd", "", "restore: brokerd binary to exec (default: this binary's copy of brokerd's start path)")
	fs.Float64Var(&o.churnRate, "churn-rate", 2000, "churn: leases issued per simulated hour")
	fs.DurationVar(&o.churnTTL, "churn-ttl", 15*time.Minute, "churn: lease TTL")
	fs.DurationVar(&o.churnHours, "churn-duration", 24*time.Hour, "churn: simulated time measured at steady state")
	fs.DurationVar(&o.retention, "retention", broker.DefaultTombstoneRetention, "churn: tombstone retention (store.tombstone_retention)")
	fs.IntVar(&o.maxConns, "max-conns", 0, "in-process broker: targets[].max_conns (0: brokerd's default)")
	fs.IntVar(&o.scramIterations, "scram-iterations", postgres.DefaultScramIterations, "in-process broker: targets[].scram_iterations, and the iterations of the baselines' verifiers")
	fs.IntVar(&o.brokerRevokeConc, "broker-revoke-concurrency", 0, "in-process broker: expiry.revoke_concurrency (0: brokerd's default)")
	fs.Float64Var(&o.brokerRevokeRate, "broker-revoke-rate", 0, "in-process broker: expiry.revoke_rate per second (0: brokerd's default)")
	fs.StringVar(&o.pgURL, "pg-url", "", "admin URL of an existing PostgreSQL target, without password (default: start a throwaway cluster)")
	fs.StringVar(&o.pgPasswordFile, "pg-password-file", "", "file holding the admin password for --pg-url (default: $PGPASSWORD)")
	fs.StringVar(&o.brokerAddr, "broker", "", "gRPC address of a running broker serving --pg-url's target (default: an in-process broker)")
	fs.StringVar(&o.role, "role", benchRole, "with --broker: the broker role to issue")
	fs.StringVar(&o.proxyRole, "proxy-role", benchProxy, "with --pg-url: that role's proxy role")
	fs.StringVar(&o.markerRole, "marker-role", postgres.DefaultMarkerRole, "with --pg-url: the target's marker role")
	fs.BoolVar(&o.pgDurable, "pg-durable", true, "own cluster: fsync and synchronous_commit on, as in production")
	fs.StringVar(&o.etcdBin, "etcd-bin", "", "etcd-store, etcd: the etcd binary (default: $CREDBROKER_ETCD_BIN, else what `make etcd` built)")
	fs.IntVar(&o.etcdClients, "etcd-clients", 16, "etcd-store, etcd: concurrent clients")
	fs.IntVar(&o.failoverKills, "failover-kills", 10, "failover: how many times the leader is killed")
	fs.IntVar(&o.failoverExpiring, "failover-expiring", 10, "failover: leases issued just before each kill, expiring while no instance leads")
	fs.DurationVar(&o.failoverTTL, "failover-session-ttl", etcd.DefaultSessionTTL, "failover: the group's store.etcd.session_ttl")
	fs.StringVar(&o.pin, "pin", "both", "issue, renew, revoke: off (shared CPUs), on (PostgreSQL on half the CPUs, the broker and the clients on the other half) or both, one after the other; own cluster only (default off with --pg-url or one CPU)")
	fs.IntVar(&o.streams, "streams", 10_000, "streams: concurrent KeepAlive streams, one lease each")
	fs.DurationVar(&o.streamsTTL, "streams-ttl", time.Minute, "streams: the leases' TTL; each stream renews at 2/3 of it, as the Go client does")
	fs.DurationVar(&o.streamsWindow, "streams-window", 30*time.Second, "streams: length of the steady-state window CPU and memory are measured over")
	fs.IntVar(&o.streamsConns, "streams-conns", 0, "streams: gRPC connections the streams share (0: one per stream, as sidecars have)")
	fs.StringVar(&o.profileDir, "profile-dir", "", "write CPU profiles of the in-process broker (issue at 16 clients, expiry burst) here")
	fs.BoolVar(&o.verbose, "v", false, "log the broker's warnings to stderr")
	o.pgConf = map[string]string{}
	fs.Func("pg-conf", "own cluster: a server setting KEY=VALUE (repeatable), e.g. log_min_duration_statement=0", func(v string) error {
		k, val, ok := strings.Cut(v, "=")
		if !ok || k == "" {
			return fmt.Errorf("want KEY=VALUE, got %q", v)
		}
		o.pgConf[k] = val
		return nil
	})
	fs.BoolVar(&o.keepLog, "keep-pg-log", false, "own cluster: copy the server log to ./credbroker-bench-pg.log before removing the cluster")
	version := fs.Bool("version", false, "print the build's version and exit")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if *version {
		return nil, errVersion
	}
	pinSet := false
	fs.Visit(func(f *flag.Flag) { pinSet = pinSet || f.Name == "pin" })
	if _, ok := pinModes[o.pin]; !ok {
		return nil, fmt.Errorf("--pin: want off, on or both, got %q", o.pin)
	}
	if !pinSet && (o.pgURL != "" || numCPU() < 2) {
		o.pin = "off"
	}
	if o.pin != "off" && o.pgURL != "" {
		return nil, errors.New("--pin needs the bench's own PostgreSQL cluster (not --pg-url)")
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	for _, s := range strings.Split(*scen, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !slices.Contains(allScenarios, s) {
			return nil, fmt.Errorf("--scenarios: unknown scenario %q (want %s)", s, strings.Join(allScenarios, ","))
		}
		o.scenarios = append(o.scenarios, s)
	}
	for _, s := range strings.Split(*levels, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("--levels: %q is not a positive number", s)
		}
		o.levels = append(o.levels, n)
	}
	switch {
	case o.rounds < 1, o.streams < 1, o.streamsConns < 0, o.streamsTTL < 3*time.Second, o.streamsWindow <= 0, o.renewConc < 1, o.renewPerWorker < 1, o.revokeConc < 1, o.revokeN < 1, o.expiryN < 1, o.etcdClients < 1, o.failoverKills < 1:
		return nil, errors.New("--rounds, --streams, --streams-window, --renew-*, --revoke-concurrency, --expiry-n --etcd-clients and --failover-kills must be positive, --streams-conns not negative, --streams-ttl at least 3s")
	case o.restoreActive > o.restoreRecords:
		return nil, errors.New("--restore-active must not exceed --restore-records")
	case o.brokerAddr != "" && o.pgURL == "":
		return nil, errors.New("--broker needs --pg-url: the baseline runs against the broker's target")
	case o.churnRate < 60:
		return nil, errors.New("--churn-rate must be at least 60 per hour")
	}
	return o, nil
}

// errVersion is parseFlags' answer to --version.
var errVersion = errors.New("--version")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if errors.Is(err, errVersion) {
		fmt.Fprintf(stdout, "credbroker-bench version %s\n", buildinfo.Read())
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "credbroker-bench: %v\n", err)
		return 2
	}
	level := slog.LevelError
	if o.verbose {
		level = slog.LevelWarn
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	progress := func(format string, args ...any) {
		fmt.Fprintf(stderr, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}

	start := time.Now()
	loadStart := readLoadAvg()
	progress("setting up (load average %s on %d CPUs)", loadStart, numCPU())
	e, err := setup(ctx, o, log)
	if err != nil {
		fmt.Fprintf(stderr, "credbroker-bench: setup: %v\n", err)
		return 1
	}
	defer e.close()
	e.busy = loadStart.busy(numCPU())
	rep := &report{live: stderr}
	failed := false
	fail := func(what string, err error) {
		failed = true
		fmt.Fprintf(stderr, "credbroker-bench: %s: %v\n", what, err)
		rep.note("%s failed: %v", what, err)
	}
	if e.busy {
		progress("the machine is busy (load average %s on %d CPUs): figures will be noisy", loadStart, numCPU())
	}
	if o.rounds < 3 {
		rep.note("%d rounds: issue 14 asks for the median of at least 3", o.rounds)
	}

	var issue16 float64
	modes := pinModes[o.pin]
	if !slices.ContainsFunc(o.scenarios, pinnable) {
		modes = []bool{false}
	}
	if o.has("issue") && e.broker != nil {
		progress("issue: starting a broker process")
		e.issueBroker, err = e.startChild(ctx, "issue-broker", e.markerRole+"_issue", filepath.Join(e.tmp, "issue-broker.db"))
		if err != nil {
			fail("issue", fmt.Errorf("starting the broker process: %w", err))
		}
	}
	for _, pinned := range modes {
		if pinned || e.pinned {
			if err := e.setPinned(ctx, pinned); err != nil {
				fail("--pin", err)
				break
			}
		}
		mode := modeName(pinned)
		if pinned {
			rep.mode = "pinned"
			progress("pinned: PostgreSQL on %s, the broker and the clients on %s", fmtCPUs(e.cpus.pg), fmtCPUs(e.cpus.rest))
		}
		if o.has("issue") && (e.issueBroker != nil || e.broker == nil) {
			progress("issue (%s): levels %v, %d rounds of %s per side", mode, o.levels, o.rounds, o.phase)
			if v := e.runIssue(ctx, rep); !pinned {
				issue16 = v
			}
		}
		if o.has("revoke") {
			progress("revoke (%s): %d per side, %d clients", mode, o.revokeN, o.revokeConc)
			if err := e.runRevoke(ctx, rep); err != nil {
				fail("revoke", err)
			}
		}
		if o.has("renew") {
			progress("renew (%s): %d clients", mode, o.renewConc)
			if err := e.runRenew(ctx, rep); err != nil {
				fail("renew", err)
			}
		}
		rep.mode = ""
	}
	if e.pinned {
		if err := e.setPinned(ctx, false); err != nil {
			fail("--pin", err)
		}
	}
	if e.issueBroker != nil {
		e.stopChild(ctx, e.issueBroker)
		e.issueBroker = nil
	}
	if o.has("streams") {
		progress("streams: %d KeepAlive streams, TTL %s", o.streams, o.streamsTTL)
		if err := e.runStreams(ctx, rep); err != nil {
			fail("streams", err)
		}
	}
	if o.has("expiry") {
		progress("expiry burst: %d leases", o.expiryN)
		if err := e.runExpiry(ctx, rep, issue16); err != nil {
			fail("expiry", err)
		}
	}
	if o.has("restore") {
		progress("restore: %d records", o.restoreRecords)
		if err := e.runRestore(ctx, rep); err != nil {
			fail("restore", err)
		}
	}
	if o.has("churn") {
		progress("churn: %s simulated", o.retention+o.churnHours)
		if err := e.runChurn(ctx, rep); err != nil {
			fail("churn", err)
		}
	}
	if o.has("etcd-store") {
		progress("etcd-store: etcd against bbolt, %d clients", o.etcdClients)
		if err := e.runEtcdStore(ctx, rep); err != nil {
			fail("etcd-store", err)
		}
	}
	if o.has("etcd") {
		progress("etcd: a broker on etcd against the broker on bbolt, %d clients", o.etcdClients)
		if err := e.runEtcdBroker(ctx, rep); err != nil {
			fail("etcd", err)
		}
	}
	if o.has("failover") {
		progress("failover: kill -9 the leader of two brokerd on etcd, %d times", o.failoverKills)
		if err := e.runFailover(ctx, rep); err != nil {
			fail("failover", err)
		}
	}
	if ctx.Err() != nil {
		fmt.Fprintln(stderr, "credbroker-bench: interrupted")
		return 1
	}

	loadEnd := readLoadAvg()
	fmt.Fprintf(stdout, "credbroker-bench: %d CPUs, %s, PostgreSQL %s (%s), GOMAXPROCS %d, %s\n",
		runtime.NumCPU(), memTotal(), e.pgVersion, e.describeTarget(), runtime.GOMAXPROCS(0), time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(stdout, "load average: %s at the start, %s at the end (1, 5, 15 minutes)\n", loadStart, loadEnd)
	if w := busyWarning(loadStart, loadEnd, runtime.NumCPU()); w != "" {
		fmt.Fprintln(stdout, w)
	}
	fmt.Fprintf(stdout, "broker: %s\n", e.describeBroker())
	fmt.Fprintf(stdout, "every figure: the median of %d rounds (min–max)%s\n\n", o.rounds, e.describePin(modes))
	printTable(stdout, rep.rows)
	if len(rep.notes) > 0 {
		fmt.Fprintln(stdout)
		for _, n := range rep.notes {
			fmt.Fprintf(stdout, "- %s\n", n)
		}
	}
	fmt.Fprintf(stdout, "\ntotal run time %s\n", fmtDur(time.Since(start)))
	if failed {
		return 1
	}
	return 0
}

func (e *env) describeTarget() string {
	if e.cluster != nil {
		d := "own throwaway cluster, fsync on"
		if !e.opts.pgDurable {
			d = "own throwaway cluster, fsync off"
		}
		return d
	}
	return "--pg-url"
}

func (e *env) describeBroker() string {
	if e.broker == nil {
		return "external, " + e.opts.brokerAddr
	}
	issue := "a broker process of its own (self-exec of brokerd's start path)"
	if e.opts.brokerd != "" {
		issue = "a broker process of its own (" + filepath.Base(e.opts.brokerd) + ")"
	}
	return fmt.Sprintf("in-process over loopback gRPC (issue and streams: %s), bbolt with fsync, max_conns %d, scram_iterations %d, revoke_concurrency %d, revoke_rate %.0f/s",
		issue, e.maxConns(), e.opts.scramIterations, e.revokeConcurrency(), e.revokeRate())
}

// printTable writes the rows as a Markdown table, aligned for a terminal.
func printTable(w io.Writer, rows []row) {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "| scenario\t| figure\t| broker\t| baseline (pgx)\t| ratio\t| target\t| met\t|")
	fmt.Fprintln(tw, "|---\t|---\t|---\t|---\t|---\t|---\t|---\t|")
	for _, r := range rows {
		fmt.Fprintf(tw, "| %s\t| %s\t| %s\t| %s\t| %s\t| %s\t| %s\t|\n", r.scenario, r.figure, r.broker, r.baseline, r.ratio, r.target, r.met)
	}
	_ = tw.Flush()
}

func memTotal() string {
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "memory unknown"
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return fmt.Sprintf("%.1f GiB RAM", float64(kb)/(1<<20))
		}
	}
	return "memory unknown"
}

// describePin says which modes the pinnable scenarios ran in.
func (e *env) describePin(modes []bool) string {
	if len(modes) == 1 && !modes[0] {
		return "; CPUs shared (--pin off)"
	}
	return fmt.Sprintf("; rows marked pinned: PostgreSQL on %s, the broker and the bench's clients on %s (--pin)", fmtCPUs(e.cpus.pg), fmtCPUs(e.cpus.rest))
}
