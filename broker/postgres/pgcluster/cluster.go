package pgcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// TempPrefix starts the name of every directory pgcluster creates, so
	// that the leftovers of a killed run can be recognized and removed.
	TempPrefix = "credbroker-pg-"
	// ownerFile, inside a directory pgcluster created, holds the pid of the
	// process that created it: the directory is stale once that process and
	// the postmaster are both gone.
	ownerFile = "credbroker-owner.pid"
	// superuser is the bootstrap superuser initdb creates (-U).
	superuser = "postgres"
	// maxSocketPath keeps "<dir>/.s.PGSQL.<port>" inside sun_path (108
	// bytes with the NUL on Linux), with some slack.
	maxSocketPath = 100
	// confFile holds pgcluster's settings; postgresql.conf includes it, so a
	// reused data directory gets fresh settings without piling up lines.
	confFile = "credbroker.conf"
)

// Options say how to start a cluster. The zero value is a fresh cluster in
// a temporary directory on a free loopback port.
type Options struct {
	// BinDir holds initdb and postgres; "" finds them (see FindBinDir).
	BinDir string
	// Dir is where the data directory, socket and log go; "" is a fresh
	// temporary directory that Stop removes. A Dir that already holds a
	// data directory is reused (no initdb), and Stop leaves it in place.
	Dir string
	// Port is the TCP port on 127.0.0.1; 0 picks a free one.
	Port int
	// LogStatements logs every statement (log_statement=all), for tests
	// that prove no password ever reaches the server log.
	LogStatements bool
	// ExtraConf is appended to the server configuration, overriding
	// pgcluster's own settings.
	ExtraConf map[string]string
	// Stdout, if set, also receives initdb's output and the server log.
	Stdout io.Writer
}

// Cluster is a running throwaway PostgreSQL server.
type Cluster struct {
	// Host is the TCP address the server listens on: always 127.0.0.1.
	Host string
	// Port is the TCP port.
	Port int
	// SocketDir holds the unix socket (the superuser connects there too).
	SocketDir string
	// Superuser is the bootstrap superuser, "postgres"; it needs no
	// password over the socket and over 127.0.0.1.
	Superuser string
	// DataDir is the cluster's data directory.
	DataDir string
	// LogFile receives the server's log.
	LogFile string
	// Version is the server's major version (15 for 15.18).
	Version int

	binDir     string
	env        []string
	cred       *syscall.Credential // nil: run as ourselves
	removeDirs []string            // directories we created; Stop removes them
	logf       *os.File
	cmd        *exec.Cmd
	exited     chan struct{} // closed once the server process has been reaped
	waitErr    error         // the server's exit status; read after exited is closed

	stopOnce sync.Once
	stopErr  error
}

// FindBinDir finds a directory holding initdb and postgres:
// $CREDBROKER_PG_BINDIR if set (an error if it holds no binaries, rather
// than silently using others), then `pg_config --bindir`, then the newest
// /usr/lib/postgresql/<major>/bin, then PATH.
func FindBinDir() (string, error) {
	if d := os.Getenv("CREDBROKER_PG_BINDIR"); d != "" {
		if err := checkBinDir(d); err != nil {
			return "", fmt.Errorf("pgcluster: $CREDBROKER_PG_BINDIR: %w", err)
		}
		return d, nil
	}
	if pgConfig, err := exec.LookPath("pg_config"); err == nil {
		if out, err := exec.Command(pgConfig, "--bindir").Output(); err == nil {
			if d := strings.TrimSpace(string(out)); checkBinDir(d) == nil {
				return d, nil
			}
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	major := func(d string) int {
		n, _ := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		return n
	}
	sort.Slice(dirs, func(i, j int) bool { return major(dirs[i]) > major(dirs[j]) })
	for _, d := range dirs {
		if checkBinDir(d) == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if d := filepath.Dir(p); checkBinDir(d) == nil {
			return d, nil
		}
	}
	return "", errors.New("pgcluster: no PostgreSQL binaries found " +
		"(looked at $CREDBROKER_PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH); " +
		"install PostgreSQL (Debian: apt-get install postgresql) or set CREDBROKER_PG_BINDIR")
}

func checkBinDir(dir string) error {
	for _, name := range []string{"initdb", "postgres"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return fmt.Errorf("%s has no %s", dir, name)
		}
		if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			return fmt.Errorf("%s/%s is not an executable file", dir, name)
		}
	}
	return nil
}

// errPortInUse marks a start that failed because another process took the
// port between our probe and the server's bind; Start then retries.
var errPortInUse = errors.New("port in use")

// Start initializes (unless Dir already holds one) and starts a cluster,
// and returns once it accepts connections. The caller must Stop it. ctx
// bounds the start-up only, not the cluster's life.
func Start(ctx context.Context, o Options) (*Cluster, error) {
	binDir := o.BinDir
	if binDir == "" {
		d, err := FindBinDir()
		if err != nil {
			return nil, err
		}
		binDir = d
	} else if err := checkBinDir(binDir); err != nil {
		return nil, fmt.Errorf("pgcluster: BinDir: %w", err)
	}
	RemoveStale()

	c := &Cluster{Host: "127.0.0.1", Superuser: superuser, binDir: binDir, env: serverEnv(binDir)}
	if os.Geteuid() == 0 {
		cred, err := postgresCredential()
		if err != nil {
			return nil, err
		}
		c.cred = cred
	}
	ok := false
	defer func() {
		if !ok {
			_ = c.Stop()
		}
	}()

	base := o.Dir
	if base == "" {
		d, err := c.tempDir(os.TempDir())
		if err != nil {
			return nil, err
		}
		base = d
	} else {
		abs, err := filepath.Abs(base)
		if err != nil {
			return nil, fmt.Errorf("pgcluster: Dir: %w", err)
		}
		base = abs
		if err := os.MkdirAll(base, 0o700); err != nil {
			return nil, fmt.Errorf("pgcluster: Dir: %w", err)
		}
		if err := c.handOver(base); err != nil {
			return nil, err
		}
		if err := c.checkReachable(base); err != nil {
			return nil, err
		}
	}
	c.DataDir = filepath.Join(base, "data")
	c.LogFile = filepath.Join(base, "postgres.log")
	c.SocketDir = base
	if len(base)+len("/.s.PGSQL.65535") > maxSocketPath {
		d, err := c.tempDir("/tmp")
		if err != nil {
			return nil, err
		}
		c.SocketDir = d
	}

	if _, err := os.Stat(filepath.Join(c.DataDir, "PG_VERSION")); err != nil {
		if err := c.initdb(ctx, base, o.Stdout); err != nil {
			return nil, err
		}
	}
	v, err := os.ReadFile(filepath.Join(c.DataDir, "PG_VERSION"))
	if err != nil {
		return nil, fmt.Errorf("pgcluster: %w", err)
	}
	if c.Version, err = strconv.Atoi(strings.TrimSpace(string(v))); err != nil {
		return nil, fmt.Errorf("pgcluster: PG_VERSION %q: %w", v, err)
	}
	if err := c.configure(o); err != nil {
		return nil, err
	}
	c.logf, err = os.OpenFile(c.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("pgcluster: %w", err)
	}

	for attempt := 1; ; attempt++ {
		port := o.Port
		if port == 0 {
			if port, err = freePort(); err != nil {
				return nil, err
			}
		}
		err = c.launch(ctx, port, base, o.Stdout)
		if err == nil {
			ok = true
			return c, nil
		}
		if o.Port != 0 || !errors.Is(err, errPortInUse) || attempt == 5 {
			return nil, err
		}
	}
}

// postgresCredential is who initdb and the server run as when we are root:
// initdb refuses root, and the system "postgres" user is the usual owner.
func postgresCredential() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("pgcluster: running as root, and initdb refuses root; "+
			"there is no system user \"postgres\" to run it as (%v): create one or run as a non-root user", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("pgcluster: user postgres has a non-numeric uid/gid %q/%q", u.Uid, u.Gid)
	}
	// Groups set to empty drops root's supplementary groups.
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}

// serverEnv is our environment plus, for relocatable builds (the npm
// @embedded-postgres packages ship their own libraries beside bin/), the
// library directory next to BinDir.
func serverEnv(binDir string) []string {
	env := os.Environ()
	lib := filepath.Join(binDir, "..", "lib")
	if fi, err := os.Stat(lib); err == nil && fi.IsDir() {
		lib = filepath.Clean(lib)
		if old := os.Getenv("LD_LIBRARY_PATH"); old != "" {
			lib += ":" + old
		}
		env = append(env, "LD_LIBRARY_PATH="+lib)
	}
	return env
}

// tempDir creates a recognizable directory under parent, records us as its
// owner (see RemoveStale), hands it to the server's user, and has Stop
// remove it.
func (c *Cluster) tempDir(parent string) (string, error) {
	d, err := os.MkdirTemp(parent, TempPrefix)
	if err != nil {
		return "", fmt.Errorf("pgcluster: %w", err)
	}
	c.removeDirs = append(c.removeDirs, d)
	if err := os.WriteFile(filepath.Join(d, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return "", fmt.Errorf("pgcluster: %w", err)
	}
	return d, c.handOver(d)
}

// handOver gives a directory to the user the server runs as.
func (c *Cluster) handOver(path string) error {
	if c.cred == nil {
		return nil
	}
	if err := os.Chown(path, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
		return fmt.Errorf("pgcluster: %w", err)
	}
	return nil
}

// checkReachable fails early, with a clear message, when the server's user
// cannot traverse the parents of a caller-chosen Dir (t.TempDir() parents
// are 0700 root), rather than letting initdb fail obscurely.
func (c *Cluster) checkReachable(dir string) error {
	if c.cred == nil {
		return nil
	}
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("pgcluster: %w", err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		m := fi.Mode().Perm()
		ok := m&0o001 != 0 ||
			(st.Uid == c.cred.Uid && m&0o100 != 0) ||
			(st.Gid == c.cred.Gid && m&0o010 != 0)
		if !ok {
			return fmt.Errorf("pgcluster: Dir %s: user postgres cannot enter %s (mode %v); "+
				"leave Dir empty for a temporary directory, or choose one postgres can reach", dir, p, m)
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

func (c *Cluster) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(c.binDir, name), args...)
	cmd.Env = c.env
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: c.cred,
		// Its own process group: a terminal's Ctrl-C reaches only our
		// process, which then shuts the server down in order (brokerd dev
		// revokes users before the cluster goes).
		Setpgid: true,
		// Never outlive the process that started us (a killed test binary).
		Pdeathsig: syscall.SIGQUIT,
	}
	return cmd
}

func (c *Cluster) initdb(ctx context.Context, base string, stdout io.Writer) error {
	cmd := c.command("initdb",
		"-D", c.DataDir, "-U", superuser,
		// pg_hba.conf is rewritten right after; trust only until then.
		"-A", "trust",
		"-E", "UTF8", "--locale=C",
		// Nothing here needs to survive a power cut.
		"--no-sync")
	cmd.Dir = base
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if stdout != nil {
		cmd.Stdout = io.MultiWriter(&out, stdout)
		cmd.Stderr = cmd.Stdout
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			if cmd.Process != nil {
				_ = cmd.Process.Kill()
			}
		case <-done:
		}
	}()
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("pgcluster: initdb: %w", ctx.Err())
		}
		return fmt.Errorf("pgcluster: initdb (%s): %w\n%s", c.binDir, err, tail(out.Bytes(), 2000))
	}
	return nil
}

// configure writes pg_hba.conf and pgcluster's settings. The files are
// rewritten in place, so they keep the owner initdb gave them.
func (c *Cluster) configure(o Options) error {
	hba := "# Written by credbroker's pgcluster.\n" +
		"# The superuser needs no password (bootstrap); every other role must\n" +
		"# log in over TCP with its SCRAM-SHA-256 password.\n" +
		"local all all trust\n" +
		"host all " + superuser + " 127.0.0.1/32 trust\n" +
		"host all all 127.0.0.1/32 scram-sha-256\n"
	if err := c.writeOwned(filepath.Join(c.DataDir, "pg_hba.conf"), hba); err != nil {
		return err
	}

	settings := [][2]string{
		{"listen_addresses", "127.0.0.1"},
		{"unix_socket_directories", c.SocketDir},
		{"password_encryption", "scram-sha-256"},
		// Speed over durability: the cluster is thrown away.
		{"fsync", "off"},
		{"synchronous_commit", "off"},
		{"full_page_writes", "off"},
		{"max_connections", "200"},
		{"shared_buffers", "64MB"},
		{"logging_collector", "off"},
		{"log_destination", "stderr"},
		{"log_line_prefix", "%m [%p] %q%u@%d "},
	}
	if o.LogStatements {
		settings = append(settings, [2]string{"log_statement", "all"})
	}
	keys := make([]string, 0, len(o.ExtraConf))
	for k := range o.ExtraConf {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		settings = append(settings, [2]string{k, o.ExtraConf[k]})
	}
	var b strings.Builder
	b.WriteString("# Written by credbroker's pgcluster on every start.\n")
	for _, kv := range settings {
		fmt.Fprintf(&b, "%s = '%s'\n", kv[0], strings.ReplaceAll(kv[1], "'", "''"))
	}
	if err := c.writeOwned(filepath.Join(c.DataDir, confFile), b.String()); err != nil {
		return err
	}

	main := filepath.Join(c.DataDir, "postgresql.conf")
	cur, err := os.ReadFile(main)
	if err != nil {
		return fmt.Errorf("pgcluster: %w", err)
	}
	include := "include '" + confFile + "'"
	if !bytes.Contains(cur, []byte(include)) {
		f, err := os.OpenFile(main, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return fmt.Errorf("pgcluster: %w", err)
		}
		_, err = f.WriteString("\n" + include + "\n")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("pgcluster: %w", err)
		}
	}
	return nil
}

// writeOwned writes a file in the data directory that the server must be
// able to read.
func (c *Cluster) writeOwned(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("pgcluster: %w", err)
	}
	if c.cred != nil {
		if err := os.Chown(path, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			return fmt.Errorf("pgcluster: %w", err)
		}
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgcluster: finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// launch starts the server on port and waits until it accepts connections.
func (c *Cluster) launch(ctx context.Context, port int, base string, stdout io.Writer) error {
	logStart, _ := c.logf.Seek(0, io.SeekEnd)
	cmd := c.command("postgres", "-D", c.DataDir, "-p", strconv.Itoa(port))
	cmd.Dir = base
	// The log file is handed to the server as its stderr file descriptor,
	// so every line is on disk before the statement that caused it returns.
	var w io.Writer = c.logf
	if stdout != nil {
		w = io.MultiWriter(c.logf, stdout)
	}
	cmd.Stdout, cmd.Stderr = w, w

	started := make(chan error, 1)
	exited := make(chan struct{})
	go func() {
		// Pdeathsig fires when the *thread* that forked the child exits, not
		// the process. Go may end an OS thread under us, so fork from a
		// locked thread that lives exactly as long as the server.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		c.waitErr = cmd.Wait()
		close(exited)
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("pgcluster: starting postgres: %w", err)
	}
	c.cmd, c.exited, c.Port = cmd, exited, port

	err := c.waitReady(ctx)
	if err == nil {
		return nil
	}
	_ = c.shutdown(5 * time.Second)
	c.cmd, c.exited = nil, nil
	out := c.logSince(logStart)
	if bytes.Contains(out, []byte("could not bind")) || bytes.Contains(out, []byte("already in use")) {
		return fmt.Errorf("pgcluster: port %d: %w", port, errPortInUse)
	}
	return fmt.Errorf("pgcluster: server did not become ready: %w\n%s", err, tail(out, 4000))
}

// waitReady polls a connection over the cluster's own unix socket: it is
// unique to this cluster (a TCP probe could reach another server that took
// the port), and the server creates it only after its TCP socket is bound.
func (c *Cluster) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	connString := fmt.Sprintf("host=%s port=%d user=%s dbname=postgres sslmode=disable connect_timeout=10",
		c.SocketDir, c.Port, superuser)
	delay := 5 * time.Millisecond
	for {
		conn, err := pgconn.Connect(ctx, connString)
		if err == nil {
			return conn.Close(ctx)
		}
		t := time.NewTimer(delay)
		select {
		case <-c.exited:
			t.Stop()
			return fmt.Errorf("server exited: %v", c.waitErr)
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (last attempt: %v)", ctx.Err(), err)
		case <-t.C:
		}
		delay = min(delay*2, 100*time.Millisecond)
	}
}

func (c *Cluster) logSince(off int64) []byte {
	b, _ := os.ReadFile(c.LogFile)
	if off >= 0 && off <= int64(len(b)) {
		b = b[off:]
	}
	return b
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// URL is a postgres:// URL for user on database over TCP 127.0.0.1, with
// sslmode=disable; an empty password is left out.
func (c *Cluster) URL(user, password, database string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(user),
		Host:     net.JoinHostPort(c.Host, strconv.Itoa(c.Port)),
		Path:     "/" + database,
		RawQuery: "sslmode=disable",
	}
	if password != "" {
		u.User = url.UserPassword(user, password)
	}
	return u.String()
}

// SuperuserURL is a URL for the superuser (no password needed) on database.
func (c *Cluster) SuperuserURL(database string) string {
	return c.URL(c.Superuser, "", database)
}

// Log returns the server log so far.
func (c *Cluster) Log() ([]byte, error) {
	return os.ReadFile(c.LogFile)
}

// Stop shuts the server down (fast shutdown: sessions are ended), waits for
// it, and removes the directories Start created. It is idempotent.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		if c.cmd != nil {
			errs = append(errs, c.shutdown(30*time.Second))
		}
		if c.logf != nil {
			errs = append(errs, c.logf.Close())
		}
		for _, d := range c.removeDirs {
			errs = append(errs, os.RemoveAll(d))
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// shutdown asks for a fast shutdown and escalates to an immediate one
// (SIGQUIT), then SIGKILL, if the server does not exit in time.
func (c *Cluster) shutdown(grace time.Duration) error {
	select {
	case <-c.exited:
		return nil
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.exited:
		return nil
	case <-time.After(grace):
	}
	_ = c.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-c.exited:
		return fmt.Errorf("pgcluster: server ignored fast shutdown for %v; sent SIGQUIT", grace)
	case <-time.After(10 * time.Second):
	}
	_ = c.cmd.Process.Kill()
	<-c.exited
	return errors.New("pgcluster: server ignored SIGQUIT; killed it")
}

// RemoveStale removes the directories of earlier clusters whose creator
// and postmaster are both gone (a test binary killed by a timeout leaves
// them behind; its server dies with it, see Pdeathsig). Start calls it.
func RemoveStale() {
	seen := map[string]bool{}
	for _, parent := range []string{os.TempDir(), "/tmp"} {
		dirs, _ := filepath.Glob(filepath.Join(parent, TempPrefix+"*"))
		for _, d := range dirs {
			if seen[d] {
				continue
			}
			seen[d] = true
			fi, err := os.Lstat(d)
			if err != nil || !fi.IsDir() {
				continue // never follow a symlink someone planted in /tmp
			}
			owner, err := readPid(filepath.Join(d, ownerFile))
			if err != nil {
				// Created a moment ago and the owner file not yet written?
				if time.Since(fi.ModTime()) < time.Minute {
					continue
				}
			} else if pidAlive(owner) {
				continue
			}
			if pm, err := readPid(filepath.Join(d, "data", "postmaster.pid")); err == nil && pidAlive(pm) {
				continue
			}
			_ = os.RemoveAll(d)
		}
	}
}

// readPid reads the pid on the first line of a file.
func readPid(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("bad pid in %s", path)
	}
	return pid, nil
}

// pidAlive reports whether pid runs. A zombie (dead, not yet reaped: some
// container init processes are slow to reap orphans) counts as dead.
func pidAlive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return !os.IsNotExist(err)
	}
	// The state follows the parenthesized command name, which may itself
	// contain ") ".
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z'
	}
	return true
}
