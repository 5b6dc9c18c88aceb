package main

import (
	"time"

	"github.com/credbroker/credbroker/broker/postgres"
)

// The baseline sends the statements broker/postgres's Engine sends for the
// same operation: the engine's own builders, so the two cannot drift.

// issueSQL is Engine.NewUser's statement for one user (see
// postgres.CreateUserSQL). The marker role is the baseline's own (see
// env.baseMarker), so the broker never reconciles these users away.
func (e *env) issueSQL(user, verifier string, validUntil time.Time) string {
	return postgres.CreateUserSQL(user, e.proxyRole, e.baseMarker, verifier, validUntil)
}

// renewSQL is Engine.RenewUser's statement for one user.
func renewSQL(user string, validUntil time.Time) string {
	return postgres.RenewUserSQL(user, validUntil)
}

// dropSQL is the last statement of Engine.DeleteUser for one user.
func dropSQL(user string) string { return postgres.DropUsersSQL(user) }

// verifier is one SCRAM verifier the baseline uses for every user: the
// hashing is client-side work, not SQL, so the ceiling leaves it out.
// iterations is --scram-iterations, the broker's count.
func baselineVerifier(iterations int) string {
	v, err := postgres.ScramSHA256VerifierIter(randHex(16), iterations)
	if err != nil {
		panic(err)
	}
	return v
}
