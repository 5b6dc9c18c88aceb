// Package config owns brokerd's configuration file, as data: it parses the
// YAML (Load, Parse), checks every key and fills defaults (File.Validate,
// which yields a typed Config). It opens no file but the configuration
// itself, reads no secret, binds no socket and dials no database: package
// rootcred reads the secrets the file names, and package daemon turns a
// Config into a running broker. Defaults come from the package that owns
// each setting (broker, broker/postgres, store, server); this package
// owns only those of its own keys (DefaultListen, ...).
//
// Validation collects every problem it finds rather than stopping at the
// first, and each message starts with the key path it is about
// ("roles[2].default_ttl: ..."), so an operator can fix a file in one pass.
// No message ever contains a password: admin passwords live in a file, an
// environment variable or Vault, never in the YAML.
package config
