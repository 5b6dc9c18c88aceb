// Package postgres is credbroker's PostgreSQL engine: it implements
// broker.Database by creating, renewing and dropping short-lived LOGIN users
// that inherit an operator-defined NOLOGIN proxy role.
//
// It owns the facts that decide correctness on the server side:
//
//   - the cleartext password never reaches the server: it is hashed here into
//     a SCRAM-SHA-256 verifier (PostgreSQL logs the full text of a failing
//     statement, and CREATE ROLE takes no bind parameters);
//   - every issued user is a member of a marker role, so reconciliation can
//     find users the broker made and nothing else;
//   - revocation blocks logins, ends open sessions, reassigns and drops what
//     the user owns, then drops it, each step idempotent;
//   - the admin role is a non-superuser with the grants AdminSetupSQL
//     prints, the single source of truth shared by the README, the tests and
//     `brokerd dev`.
//
// Errors never carry a password or the admin URL; an unreachable server is
// reported wrapped in broker.ErrUnavailable.
package postgres
