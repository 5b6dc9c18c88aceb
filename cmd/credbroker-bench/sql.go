package main

import (
	"context"
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

// revokeBare is Engine.DeleteUser's sequence for one user that owns
// nothing, sent bare: logins blocked (and the user granted to the admin)
// in a transaction of their own, committed before the sessions are ended;
// its sessions ended until none is left; DROP ROLE. A user that owned
// something would need REASSIGN/DROP OWNED before the DROP (see
// postgres.DisownSQL); the bench's users own nothing, and the bare client
// is told so. What it leaves out is what the broker must find out: whether
// the user is the broker's, and whether and where it owns anything.
func (e *env) revokeBare(ctx context.Context, user string) error {
	if _, err := e.base.Exec(ctx, postgres.BlockLoginsSQL(user, e.admin)); err != nil {
		return err
	}
	for n := -1; n != 0; {
		if err := e.base.QueryRow(ctx, postgres.TerminateQuery, []string{user}).Scan(&n); err != nil {
			return err
		}
	}
	_, err := e.base.Exec(ctx, postgres.DropUsersSQL(user))
	return err
}

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
