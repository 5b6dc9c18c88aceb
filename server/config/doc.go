// Package config owns brokerd's configuration file: it parses the YAML
// (Load), checks every key and fills defaults (File.Validate, which yields
// a typed Config), and turns a Config into running parts (Build: the lease
// store, one PostgreSQL engine per target, and the broker).
//
// Validation collects every problem it finds rather than stopping at the
// first, and each message starts with the key path it is about
// ("roles[2].default_ttl: ..."), so an operator can fix a file in one pass.
// No message ever contains a password: admin passwords live in a file or an
// environment variable, never in the YAML, and are held as a Secret that
// prints as "[redacted]".
package config
