package postgres

import "context"

// ScramVerifierWithSalt exposes the deterministic core of
// ScramSHA256Verifier to the tests, for a known-answer check.
var ScramVerifierWithSalt = scramVerifier

// Ownership ends the users' sessions and returns what the engine read from
// the catalog for step 3 of DeleteUser: the users that own objects or
// hold privileges in the target's database or on shared objects, and the
// other databases where each does.
func Ownership(ctx context.Context, e *Engine, users []string) (here map[string]bool, elsewhere map[string][]string, err error) {
	owned, err := e.inner.(*engine).endSessions(ctx, users, nil)
	if err != nil {
		return nil, nil, err
	}
	elsewhere = map[string][]string{}
	for u, dbs := range owned.elsewhere {
		for _, d := range dbs {
			elsewhere[u] = append(elsewhere[u], d.name)
		}
	}
	return owned.here, elsewhere, nil
}

// HideOwnership makes the engine believe, whatever the catalog says, that
// no user owns anything: as if an object or a grant appeared after the
// catalog was read. DROP ROLE then meets what was hidden.
func HideOwnership(e *Engine) {
	e.inner.(*engine).ownershipHook = func(o *ownership) {
		o.here = map[string]bool{}
		o.elsewhere = map[string][]otherDatabase{}
	}
}
