package config

import (
	"io"
	"log/slog"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// Defaults of the keys this package owns. Every other key's default is
// exported by the package that owns the setting (broker, broker/postgres,
// store, server), and Validate fills it from there, so the effective
// configuration brokerd logs at start-up is the one it runs with and no
// default is written twice. README.md's configuration table is checked
// against all of them (TestREADMEDefaults).
const (
	DefaultListen          = "127.0.0.1:7450"
	DefaultShutdownTimeout = 15 * time.Second
	DefaultLogLevel        = "info"
	DefaultLogFormat       = "text"
)

// Config is a validated configuration with every default filled in.
type Config struct {
	// Listen is the gRPC address: host:port on loopback, or unix:/path.
	Listen string
	// Instance names this brokerd in its broker group (default: the host
	// name); unique in the group.
	Instance string
	Store    Store
	Targets  []Target
	// Roles are the broker roles, in file order.
	Roles  []broker.Role
	Expiry Expiry
	// ReconcileInterval: how often intents and unknown marker-role members
	// are settled.
	ReconcileInterval time.Duration
	// DisconnectGrace: how long a revoke_on_disconnect lease may go without
	// a KeepAlive stream naming it.
	DisconnectGrace time.Duration
	// ShutdownTimeout bounds the graceful stop of the gRPC server; streams
	// still open after it are cut.
	ShutdownTimeout time.Duration
	Log             Log
	// DSNSSLMode is the sslmode written into the DSNs handed to clients.
	DSNSSLMode string
	// Security is authentication, authorization, quotas and audit (see
	// security.go).
	Security Security
	// Metrics is the metrics and probe listener (metrics.go).
	Metrics Metrics
	// Activity is the sampling of the targets' sessions (activity.go).
	Activity Activity
	// VaultAPI is the Vault-compatible HTTP API (vaultapi.go).
	VaultAPI VaultAPI

	// Warnings are problems that do not stop brokerd (a world-readable
	// password file, a target no role uses, two roles sharing a proxy
	// role). brokerd logs them at start-up.
	Warnings []string
}

// Store configures the lease store: exactly one of Path (bbolt, one
// brokerd) and Etcd (a group of brokerd sharing one store) is set.
type Store struct {
	// Path of the bbolt file (absolute).
	Path string
	// Etcd is the etcd store of a broker group; nil with Path.
	Etcd *Etcd
	// OpenTimeout: how long to wait for the file lock another process holds.
	OpenTimeout time.Duration
	// TombstoneRetention: how long revoked and expired leases are kept.
	TombstoneRetention time.Duration
}

// Etcd is store.etcd: the lease store of a broker group on etcd v3.
type Etcd struct {
	// Endpoints are the cluster's client URLs (http:// or https://).
	Endpoints []string
	// Prefix is the group's key prefix, ending in "/".
	Prefix string
	// SessionTTL is the leadership session's TTL, whole seconds.
	SessionTTL time.Duration
	// DialTimeout bounds the first contact with the cluster.
	DialTimeout time.Duration
	// TLS names PEM files (absolute paths); all empty means none.
	TLS EtcdTLS
	// Username and PasswordFile are etcd authentication (both or
	// neither). The daemon reads the file; the password is never here.
	Username     string
	PasswordFile string
}

// EtcdTLS is store.etcd.tls.
type EtcdTLS struct {
	CAFile   string
	CertFile string
	KeyFile  string
}

// Target is one PostgreSQL server the broker makes users on.
type Target struct {
	Name string
	// URL is the admin connection URL, without a password.
	URL string
	// Database is the database named in URL: where issued users connect.
	Database string
	// AdminUser is the user named in URL.
	AdminUser string
	// PasswordSource says where the admin password lives ("file /path",
	// "env NAME", "vault ..."), for logs.
	PasswordSource string
	// PasswordFile or PasswordEnv or Vault is the source of the admin
	// password. Package rootcred reads it when brokerd connects, and a
	// rotation writes the new password back to a file or Vault.
	PasswordFile string
	PasswordEnv  string
	Vault        *Vault
	// MarkerRole is the NOLOGIN role every issued user is made a member of.
	MarkerRole string
	// MaxConns caps the admin connection pool.
	MaxConns int
	// ConnectTimeout bounds one connection attempt.
	ConnectTimeout time.Duration
	// ScramIterations is the iteration count of the SCRAM-SHA-256
	// verifiers of issued users' passwords.
	ScramIterations int
}

// Expiry tunes the expiry manager and the revoker.
type Expiry struct {
	RevokeConcurrency   int
	RevokeRate          float64
	RevokeRetries       int
	ValidUntilGrace     time.Duration
	RetryBaseDelay      time.Duration
	RetryMaxDelay       time.Duration
	FailedRetryInterval time.Duration
}

// Log configures brokerd's log.
type Log struct {
	Level slog.Level
	// Format is "text" or "json".
	Format string
}

// NewLogger returns a logger writing to w at the configured level and format.
func (l Log) NewLogger(w io.Writer) *slog.Logger {
	return l.newLogger(w, l.Level)
}

// NewLevelLogger is NewLogger filtering at a level a reload can change:
// it returns the logger and its level, set to l.Level.
func (l Log) NewLevelLogger(w io.Writer) (*slog.Logger, *slog.LevelVar) {
	lv := new(slog.LevelVar)
	lv.Set(l.Level)
	return l.newLogger(w, lv), lv
}

func (l Log) newLogger(w io.Writer, level slog.Leveler) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if l.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// TargetNames are the targets' names, in the file's order.
func (c *Config) TargetNames() []string {
	names := make([]string, 0, len(c.Targets))
	for _, t := range c.Targets {
		names = append(names, t.Name)
	}
	return names
}

// Target returns the target of that name.
func (c *Config) Target(name string) (Target, bool) {
	for _, t := range c.Targets {
		if t.Name == name {
			return t, true
		}
	}
	return Target{}, false
}
