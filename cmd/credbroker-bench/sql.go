package main

import (
	"strings"
	"time"

	"github.com/credbroker/credbroker/broker/postgres"
)

// The baseline sends the statements broker/postgres's Engine sends for the
// same operation, built the same way: keep these in step with engine.go.

func quoteLit(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

func pgTime(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05.999999-07:00") }

// issueSQL is Engine.NewUser's transaction for one user: CREATE ROLE ... IN
// ROLE proxy, marker; ALTER ROLE ... SET role. As one
// simple-protocol query it runs as one implicit transaction, in one round
// trip, as the engine sends them. The marker role is the baseline's own
// (see env.baseMarker), so the broker never reconciles these users away.
func (e *env) issueSQL(user, verifier string, validUntil time.Time) string {
	q := postgres.QuoteIdentifier
	u, proxy := q(user), q(e.proxyRole)
	return "CREATE ROLE " + u + " LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS" +
		" PASSWORD " + quoteLit(verifier) +
		" VALID UNTIL " + quoteLit(pgTime(validUntil)) +
		" IN ROLE " + proxy + ", " + q(e.baseMarker) +
		"; ALTER ROLE " + u + " SET role = " + proxy
}

func renewSQL(user string, validUntil time.Time) string {
	return "ALTER ROLE " + postgres.QuoteIdentifier(user) + " VALID UNTIL " + quoteLit(pgTime(validUntil))
}

func dropSQL(user string) string { return "DROP ROLE " + postgres.QuoteIdentifier(user) }
