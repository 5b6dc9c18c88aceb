package config

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/etcd"
)

// targetNamePattern: target names are shown in leases and logs and used as
// map keys; they never reach SQL, but keeping them plain keeps them easy
// to grep and to type on a command line.
var targetNamePattern = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,62}$`)

var envNamePattern = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

var sslModes = []string{"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}

// validator collects every problem in one pass.
type validator struct {
	errs     []error
	warnings []string
}

func (v *validator) errorf(path, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...)))
}

func (v *validator) warnf(path, format string, args ...any) {
	v.warnings = append(v.warnings, fmt.Sprintf("%s: %s", path, fmt.Sprintf(format, args...)))
}

// Validate checks every key, fills defaults and returns the typed Config.
// It reads no secret: the files and variables that hold them are named
// here and read by package rootcred when brokerd starts (or checks). The error joins every problem found (see
// errors.Join); each names its key path. Problems that need not stop
// brokerd are returned in Config.Warnings.
func (f *File) Validate() (*Config, error) {
	v := &validator{}
	c := &Config{}

	c.Listen = f.Listen
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if _, _, err := ParseListenTLS(c.Listen, f.TLS != nil); err != nil {
		v.errs = append(v.errs, err)
	}

	c.Instance = v.instance(f.Instance)
	c.Store = v.store(f)
	c.Targets = v.targets(f)
	c.Roles = v.roles(f, c.Targets)

	c.Expiry = Expiry{
		RevokeConcurrency:   v.positiveInt("expiry.revoke_concurrency", f.Expiry.RevokeConcurrency, broker.DefaultRevokeConcurrency),
		RevokeRate:          v.positiveFloat("expiry.revoke_rate", f.Expiry.RevokeRate, broker.DefaultRevokeRate),
		RevokeRetries:       v.positiveInt("expiry.revoke_retries", f.Expiry.RevokeRetries, broker.DefaultRevokeRetries),
		ValidUntilGrace:     v.duration("expiry.valid_until_grace", f.Expiry.ValidUntilGrace, broker.DefaultValidUntilGrace),
		RetryBaseDelay:      v.duration("expiry.retry_base_delay", f.Expiry.RetryBaseDelay, broker.DefaultRetryBaseDelay),
		RetryMaxDelay:       v.duration("expiry.retry_max_delay", f.Expiry.RetryMaxDelay, broker.DefaultRetryMaxDelay),
		FailedRetryInterval: v.duration("expiry.failed_retry_interval", f.Expiry.FailedRetryInterval, broker.DefaultFailedRetryInterval),
	}
	if c.Expiry.RetryBaseDelay > c.Expiry.RetryMaxDelay && c.Expiry.RetryMaxDelay > 0 {
		v.errorf("expiry.retry_base_delay", "%s exceeds expiry.retry_max_delay %s", c.Expiry.RetryBaseDelay, c.Expiry.RetryMaxDelay)
	}
	c.ReconcileInterval = v.duration("reconcile_interval", f.ReconcileInterval, broker.DefaultReconcileInterval)
	c.DisconnectGrace = v.duration("disconnect_grace", f.DisconnectGrace, broker.DefaultDisconnectGrace)
	c.ShutdownTimeout = v.duration("shutdown_timeout", f.ShutdownTimeout, DefaultShutdownTimeout)

	c.Log = v.log(f.Log)

	c.DSNSSLMode = f.DSNSSLMode
	if c.DSNSSLMode == "" {
		c.DSNSSLMode = server.DefaultSSLMode
	}
	if !slices.Contains(sslModes, c.DSNSSLMode) {
		v.errorf("dsn_sslmode", "%q is not an sslmode; use one of %s", c.DSNSSLMode, strings.Join(sslModes, ", "))
	}

	c.Security = v.security(f, c.Roles)
	c.Metrics = v.metrics(f)
	c.Activity = v.activity(f)
	v.revokeUnused(c.Roles, c.Activity, f)
	c.VaultAPI = v.vaultAPI(f)

	c.Warnings = v.warnings
	if errs := f.withShapeErrors(v.errs); len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// withShapeErrors puts the file's shape errors (from Parse) before the
// validation errors, and drops the validation errors that only repeat a
// shape error: a value of the wrong kind at "targets" also reads as "at
// least one target is required", which says nothing new.
func (f *File) withShapeErrors(errs []error) []error {
	if len(f.shapeErrs) == 0 {
		return errs
	}
	out := make([]error, 0, len(f.shapeErrs)+len(errs))
	for _, se := range f.shapeErrs {
		out = append(out, se.err)
	}
	for _, err := range errs {
		if !f.repeatsShapeError(err.Error()) {
			out = append(out, err)
		}
	}
	return out
}

func (f *File) repeatsShapeError(msg string) bool {
	for _, se := range f.shapeErrs {
		if se.path == "" {
			return true // the whole file has the wrong shape
		}
		if rest, ok := strings.CutPrefix(msg, se.path); ok && rest != "" && strings.ContainsRune(":.[", rune(rest[0])) {
			return true
		}
	}
	return false
}

// path resolves p against the configuration file's directory.
func (f *File) path(p string) string {
	if filepath.IsAbs(p) || f.dir == "" {
		if abs, err := filepath.Abs(p); err == nil {
			return abs
		}
		return p
	}
	return filepath.Join(f.dir, p)
}

func (v *validator) store(f *File) Store {
	s := Store{
		OpenTimeout:        v.duration("store.open_timeout", f.Store.OpenTimeout, store.DefaultTimeout),
		TombstoneRetention: v.duration("store.tombstone_retention", f.Store.TombstoneRetention, broker.DefaultTombstoneRetention),
	}
	switch {
	case f.Store.Path != "" && f.Store.Etcd != nil:
		v.errorf("store", "set one of path (a bbolt file, one brokerd) and etcd (a broker group sharing etcd), not both")
		return s
	case f.Store.Etcd != nil:
		s.Etcd = v.etcd(f, f.Store.Etcd)
		return s
	case f.Store.Path == "":
		v.errorf("store.path", "required (the lease database file, e.g. /var/lib/credbroker/leases.db), or store.etcd for a broker group on etcd")
		return s
	}
	s.Path = f.path(f.Store.Path)
	if fi, err := os.Stat(s.Path); err == nil && fi.IsDir() {
		v.errorf("store.path", "%s is a directory; name a file in it", s.Path)
	}
	// A missing directory is fine (the store creates it, mode 0700); one
	// that is a file is a typo worth reporting now.
	if fi, err := os.Stat(filepath.Dir(s.Path)); err == nil && !fi.IsDir() {
		v.errorf("store.path", "%s is not a directory", filepath.Dir(s.Path))
	}
	return s
}

// instancePattern: an instance's name is part of an etcd key and shown by
// brokerctl status; a host name fits it.
var instancePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// instance is the instance key, defaulting to the host name.
func (v *validator) instance(name string) string {
	if name == "" {
		h, err := os.Hostname()
		if err != nil || !instancePattern.MatchString(h) {
			// Only a group on etcd needs a name; a bbolt broker is alone.
			return "brokerd"
		}
		return h
	}
	if !instancePattern.MatchString(name) {
		v.errorf("instance", "%q must match %s", name, instancePattern)
	}
	return name
}

// etcd checks store.etcd. It reads no file: the password file is read by
// the daemon, the TLS files by the etcd client.
func (v *validator) etcd(f *File, ef *EtcdFile) *Etcd {
	const p = "store.etcd"
	e := &Etcd{
		Prefix:       ef.Prefix,
		SessionTTL:   v.duration(p+".session_ttl", ef.SessionTTL, etcd.DefaultSessionTTL),
		DialTimeout:  v.duration(p+".dial_timeout", ef.DialTimeout, etcd.DefaultDialTimeout),
		Username:     ef.Username,
		PasswordFile: ef.PasswordFile,
	}
	if len(ef.Endpoints) == 0 {
		v.errorf(p+".endpoints", "required (the etcd members' client URLs, e.g. [https://10.0.0.1:2379])")
	}
	seen := map[string]int{}
	for i, ep := range ef.Endpoints {
		ip := fmt.Sprintf("%s.endpoints[%d]", p, i)
		u, err := url.Parse(ep)
		switch {
		case err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https"):
			v.errorf(ip, "%q is not an etcd client URL (http://HOST:PORT or https://HOST:PORT)", ep)
			continue
		case u.User != nil:
			v.errorf(ip, "must not hold credentials; use store.etcd.username and password_file")
			continue
		case u.Path != "" && u.Path != "/":
			v.errorf(ip, "%q has a path; an etcd client URL is scheme://HOST:PORT", ep)
			continue
		}
		if j, dup := seen[ep]; dup {
			v.errorf(ip, "%q is also %s.endpoints[%d]", ep, p, j)
		}
		seen[ep] = i
		e.Endpoints = append(e.Endpoints, ep)
	}
	if e.Prefix == "" {
		e.Prefix = etcd.DefaultPrefix
	}
	if err := etcd.CheckPrefix(e.Prefix); err != nil {
		v.errorf(p+".prefix", "%q must end in \"/\" (one group's keys must not be a prefix of another's)", e.Prefix)
	}
	if e.SessionTTL > 0 {
		switch {
		case e.SessionTTL < etcd.MinSessionTTL:
			v.errorf(p+".session_ttl", "%s is below the minimum %s", e.SessionTTL, etcd.MinSessionTTL)
		case e.SessionTTL%time.Second != 0:
			v.errorf(p+".session_ttl", "%s is not whole seconds (etcd leases count seconds)", e.SessionTTL)
		}
	}
	if ef.TLS != nil {
		t := ef.TLS
		if (t.CertFile == "") != (t.KeyFile == "") {
			v.errorf(p+".tls", "set cert_file and key_file together (a client certificate and its key), or neither")
		}
		if t.CAFile == "" && t.CertFile == "" && t.KeyFile == "" {
			v.errorf(p+".tls", "names no file; remove it, or set ca_file (and cert_file, key_file for client certificates)")
		}
		for _, f2 := range []struct {
			key, val string
			dst      *string
		}{
			{"ca_file", t.CAFile, &e.TLS.CAFile}, {"cert_file", t.CertFile, &e.TLS.CertFile}, {"key_file", t.KeyFile, &e.TLS.KeyFile},
		} {
			if f2.val != "" {
				*f2.dst = f.path(f2.val)
			}
		}
		for i, ep := range e.Endpoints {
			if strings.HasPrefix(ep, "http://") {
				v.errorf(fmt.Sprintf("%s.endpoints[%d]", p, i), "%q is plaintext, but store.etcd.tls is set; use https://", ep)
			}
		}
	}
	switch {
	case e.Username != "" && e.PasswordFile == "":
		v.errorf(p+".password_file", "required with store.etcd.username (a file of mode 0600 holding the etcd password)")
	case e.Username == "" && e.PasswordFile != "":
		v.errorf(p+".username", "required with store.etcd.password_file")
	case e.PasswordFile != "":
		e.PasswordFile = f.path(e.PasswordFile)
	}
	if f.Store.OpenTimeout != "" {
		v.warnf("store.open_timeout", "applies to a bbolt file only; store.etcd.dial_timeout bounds the first contact with etcd")
	}
	return e
}

func (v *validator) targets(f *File) []Target {
	if len(f.Targets) == 0 {
		v.errorf("targets", "at least one target is required")
	}
	seen := map[string]int{}
	out := make([]Target, 0, len(f.Targets))
	for i, tf := range f.Targets {
		p := fmt.Sprintf("targets[%d]", i)
		t := Target{
			Name:           tf.Name,
			MarkerRole:     tf.MarkerRole,
			ConnectTimeout: v.duration(p+".connect_timeout", tf.ConnectTimeout, postgres.DefaultConnectTimeout),
			MaxConns:       v.positiveInt(p+".max_conns", tf.MaxConns, postgres.DefaultMaxConns),
		}
		t.ScramIterations = postgres.DefaultScramIterations
		if tf.ScramIterations != nil {
			t.ScramIterations = *tf.ScramIterations
			if err := postgres.ValidScramIterations(t.ScramIterations); err != nil {
				v.errorf(p+".scram_iterations", "%d is outside %d..%d", t.ScramIterations, postgres.MinScramIterations, postgres.MaxScramIterations)
			}
		}
		switch {
		case t.Name == "":
			v.errorf(p+".name", "required")
		case !targetNamePattern.MatchString(t.Name):
			v.errorf(p+".name", "%q must match %s", t.Name, targetNamePattern)
		default:
			if j, dup := seen[t.Name]; dup {
				v.errorf(p+".name", "%q is also targets[%d].name", t.Name, j)
			}
			seen[t.Name] = i
		}

		v.targetURL(p+".url", tf.URL, &t)

		if t.MarkerRole == "" {
			t.MarkerRole = postgres.DefaultMarkerRole
		}
		if err := postgres.ValidIdentifier(t.MarkerRole); err != nil {
			v.errorf(p+".marker_role", "%v", err)
		} else if t.MarkerRole == t.AdminUser {
			v.errorf(p+".marker_role", "%q is the admin user of the target; the marker role must be a NOLOGIN role of its own", t.MarkerRole)
		}

		sources := 0
		for _, set := range []bool{tf.PasswordFile != "", tf.PasswordEnv != "", tf.Vault != nil} {
			if set {
				sources++
			}
		}
		switch {
		case sources > 1:
			v.errorf(p, "set one of password_file, password_env and vault, not several")
		case tf.PasswordFile != "":
			t.PasswordFile = f.path(tf.PasswordFile)
			t.PasswordSource = "file " + t.PasswordFile
		case tf.PasswordEnv != "":
			t.PasswordEnv = tf.PasswordEnv
			t.PasswordSource = "env " + tf.PasswordEnv
			v.passwordEnvName(p+".password_env", tf.PasswordEnv)
		case tf.Vault != nil:
			t.Vault = v.vault(p+".vault", f, tf.Vault)
			t.PasswordSource = t.Vault.String()
		default:
			v.errorf(p, "no admin password: set password_file (a file of mode 0600), password_env (an environment variable) or vault (a KV v2 secret)")
		}
		out = append(out, t)
	}
	return out
}

// targetURL checks the admin URL. It never echoes a URL that may hold a
// password, and refuses one that does: the password belongs in a file or
// the environment, not in a configuration file that gets copied around.
func (v *validator) targetURL(p, raw string, t *Target) {
	if raw == "" {
		v.errorf(p, "required (postgres://ADMIN_USER@HOST:PORT/DATABASE)")
		return
	}
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if !strings.ContainsAny(raw, "@") && !strings.Contains(raw, "password") && errors.As(err, &ue) {
			v.errorf(p, "not a valid URL: %v", ue.Err)
		} else {
			v.errorf(p, "not a valid URL (postgres://ADMIN_USER@HOST:PORT/DATABASE)")
		}
		return
	}
	if _, has := u.User.Password(); has || u.Query().Has("password") {
		v.errorf(p, "must not contain a password; use password_file or password_env")
		return
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		v.errorf(p, "scheme must be postgres:// or postgresql://, not %q", u.Scheme)
		return
	}
	t.URL = raw
	t.AdminUser = u.User.Username()
	if t.AdminUser == "" {
		v.errorf(p, "must name the admin user (postgres://ADMIN_USER@HOST:PORT/DATABASE)")
	}
	if u.Host == "" && !u.Query().Has("host") {
		v.errorf(p, "must name a host (postgres://ADMIN_USER@HOST:PORT/DATABASE, or ?host=/socket/dir)")
	}
	t.Database = strings.TrimPrefix(u.Path, "/")
	if t.Database == "" {
		v.errorf(p, "must name the database issued users connect to (postgres://ADMIN_USER@HOST:PORT/DATABASE)")
	} else if err := postgres.ValidIdentifier(t.Database); err != nil {
		v.errorf(p, "database: %v", err)
	}
}

// passwordEnvName checks an environment variable's name; its value is
// read where the secret is used (package rootcred), not here.
func (v *validator) passwordEnvName(p, name string) {
	if !envNamePattern.MatchString(name) {
		v.errorf(p, "%q is not an environment variable name", name)
	}
}

func (v *validator) roles(f *File, targets []Target) []broker.Role {
	if len(f.Roles) == 0 {
		v.errorf("roles", "at least one role is required")
	}
	targetByName := map[string]Target{}
	var targetNames []string
	for _, t := range targets {
		if t.Name != "" {
			if _, dup := targetByName[t.Name]; !dup {
				targetByName[t.Name] = t
				targetNames = append(targetNames, t.Name)
			}
		}
	}
	used := map[string]bool{}
	seen := map[string]int{}
	// proxyUse remembers which role first used a proxy role on a target, to
	// warn about overlap (the article's pitfall: two broker roles granting
	// the same privileges hide who can do what).
	proxyUse := map[[2]string]int{}
	out := make([]broker.Role, 0, len(f.Roles))
	for i, rf := range f.Roles {
		p := fmt.Sprintf("roles[%d]", i)
		r := broker.Role{Name: rf.Name, Target: rf.Target, ProxyRole: rf.ProxyRole}

		switch {
		case r.Name == "":
			v.errorf(p+".name", "required")
		case !broker.RoleNamePattern.MatchString(r.Name):
			v.errorf(p+".name", "%q must match %s (role names become part of PostgreSQL usernames)", r.Name, broker.RoleNamePattern)
		default:
			if j, dup := seen[r.Name]; dup {
				v.errorf(p+".name", "%q is also roles[%d].name", r.Name, j)
			}
			seen[r.Name] = i
		}

		t, targetOK := targetByName[r.Target]
		switch {
		case r.Target == "":
			v.errorf(p+".target", "required (one of: %s)", strings.Join(targetNames, ", "))
		case !targetOK:
			v.errorf(p+".target", "unknown target %q (targets: %s)", r.Target, strings.Join(targetNames, ", "))
		default:
			used[r.Target] = true
		}

		if r.ProxyRole == "" {
			v.errorf(p+".proxy_role", "required (an existing NOLOGIN role whose privileges issued users get)")
		} else if err := postgres.ValidIdentifier(r.ProxyRole); err != nil {
			v.errorf(p+".proxy_role", "%v", err)
		} else if targetOK {
			switch r.ProxyRole {
			case t.MarkerRole:
				v.errorf(p+".proxy_role", "%q is the marker role of target %q; use a role of its own", r.ProxyRole, t.Name)
			case t.AdminUser:
				v.errorf(p+".proxy_role", "%q is the admin user of target %q; issued users would get the broker's own privileges", r.ProxyRole, t.Name)
			default:
				key := [2]string{r.Target, r.ProxyRole}
				if j, dup := proxyUse[key]; dup {
					v.warnf(p+".proxy_role", "%q on target %q is also the proxy role of roles[%d]; two broker roles with the same privileges blur who may do what", r.ProxyRole, r.Target, j)
				} else {
					proxyUse[key] = i
				}
			}
		}

		r.DefaultTTL = v.requiredTTL(p+".default_ttl", rf.DefaultTTL)
		r.MaxTTL = v.requiredTTL(p+".max_ttl", rf.MaxTTL)
		if r.DefaultTTL > 0 && r.MaxTTL > 0 && r.DefaultTTL > r.MaxTTL {
			v.errorf(p+".default_ttl", "%s exceeds max_ttl %s", rf.DefaultTTL, rf.MaxTTL)
		}
		r.RevokeUnusedAfter = v.duration(p+".revoke_unused_after", rf.RevokeUnusedAfter, 0)
		out = append(out, r)
	}
	for i, t := range targets {
		if t.Name != "" && !used[t.Name] && len(f.Roles) > 0 {
			v.warnf(fmt.Sprintf("targets[%d]", i), "target %q is used by no role", t.Name)
		}
	}
	return out
}

func (v *validator) requiredTTL(p, raw string) time.Duration {
	if raw == "" {
		v.errorf(p, "required (a duration such as 15m or 1h)")
		return 0
	}
	return v.duration(p, raw, 0)
}

// duration parses a Go duration string; empty means def. Zero and negative
// values are refused: the broker would read zero as "use the default",
// which is not what an operator who wrote 0s meant.
func (v *validator) duration(p, raw string, def time.Duration) time.Duration {
	if raw == "" {
		return def
	}
	d, err := time.ParseDuration(raw)
	if err != nil {
		hint := "a duration such as 90s, 15m or 1h30m"
		if strings.HasSuffix(raw, "d") {
			hint += "; days are written in hours (24h)"
		}
		v.errorf(p, "%q is not a duration (%s)", raw, hint)
		return 0
	}
	if d <= 0 {
		v.errorf(p, "%s must be positive", raw)
		return 0
	}
	return d
}

func (v *validator) positiveInt(p string, n *int, def int) int {
	if n == nil {
		return def
	}
	if *n <= 0 {
		v.errorf(p, "%d must be positive", *n)
	}
	return *n
}

func (v *validator) positiveFloat(p string, n *float64, def float64) float64 {
	if n == nil {
		return def
	}
	if !(*n > 0) { // also catches NaN
		v.errorf(p, "%v must be positive", *n)
	}
	return *n
}

func (v *validator) log(l LogFile) Log {
	out := Log{Format: l.Format}
	level := l.Level
	if level == "" {
		level = DefaultLogLevel
	}
	if err := out.Level.UnmarshalText([]byte(level)); err != nil {
		v.errorf("log.level", "%q is not a level; use debug, info, warn or error", l.Level)
	}
	if out.Format == "" {
		out.Format = DefaultLogFormat
	}
	if out.Format != "text" && out.Format != "json" {
		v.errorf("log.format", "%q is not a format; use text or json", l.Format)
	}
	return out
}
