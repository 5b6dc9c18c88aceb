package daemon

import (
	"log/slog"

	"github.com/credbroker/credbroker/server/config"
)

// logConfig logs the effective configuration (no password: only where
// each one comes from) and the warnings of validation.
func logConfig(log *slog.Logger, cfg *config.Config) {
	for _, w := range cfg.Warnings {
		log.Warn("config: " + w)
	}
	if e := cfg.Store.Etcd; e != nil {
		// The password file's path, never its content.
		log.Info("store", "backend", "etcd", "instance", cfg.Instance, "endpoints", e.Endpoints, "prefix", e.Prefix,
			"session_ttl", e.SessionTTL.String(), "tls", e.TLS != config.EtcdTLS{}, "username", e.Username,
			"password_file", e.PasswordFile)
	} else {
		log.Info("store", "backend", "bbolt", "path", cfg.Store.Path)
	}
	for _, t := range cfg.Targets {
		log.Info("target", "name", t.Name, "url", t.URL, "password_source", t.PasswordSource,
			"marker_role", t.MarkerRole, "max_conns", t.MaxConns)
	}
	sec := cfg.Security
	// Token hashes and the HMAC key are not logged; how many and where from is.
	log.Info("security", "authentication", sec.Enabled(), "tls", sec.TLS != nil,
		"mutual_tls", sec.TLS != nil && sec.TLS.ClientCAFile != "", "tokens", len(sec.Tokens),
		"admins", sec.Admins, "audit_path", sec.Audit.Path, "audit_hmac", sec.Audit.HMACKeySource)
	for _, r := range cfg.Roles {
		log.Info("role", "name", r.Name, "target", r.Target, "proxy_role", r.ProxyRole,
			"allowed", sec.Allowed[r.Name],
			// Strings: the JSON handler would print durations in nanoseconds.
			"default_ttl", r.DefaultTTL.String(), "max_ttl", r.MaxTTL.String())
	}
}
