// Package rootcred keeps the broker's root credentials: the admin password
// of each target. It reads them from their sources (a file, an environment
// variable, a Vault KV v2 secret) when brokerd starts or checks (Check),
// connects each target's engine with it (Credentials.Connect), re-reads
// the sources for changes and keeps Vault tokens alive (Watch), and rotates
// a target's password in an order that survives a crash at any instant
// (Rotate; the recovery is in connect). "Rotate" in credbroker means this
// and nothing else: what a client's Keeper does to its own credential
// before the lease ends is a replacement (clients/credbroker).
//
// No secret leaves this package in an error, a log line or a printed
// value: a Secret prints as "[redacted]".
package rootcred
