// Package pgcluster runs a throwaway PostgreSQL cluster from the machine's
// PostgreSQL binaries: the server the tests of every package talk to, and the
// one `brokerd dev` starts for a newcomer.
//
// A cluster is initdb'd into a fresh directory, started as a direct child
// process (never daemonized by pg_ctl, so it cannot outlive its owner: it
// gets SIGQUIT when the parent dies), and configured for speed rather than
// durability. Authentication mirrors what the broker relies on in
// production: the superuser "postgres" is trusted over the unix socket and
// 127.0.0.1 (bootstrap needs no secret), while every other role must present
// its password with SCRAM-SHA-256 over TCP, so tests can prove that issued
// users really log in with the password they were given.
//
// PostgreSQL refuses to run as root; when the process is root, initdb and
// the server run as the system user "postgres" and the directory tree is
// handed to that user.
package pgcluster
