package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
)

// A broker group owns the marker role of each target it serves (DESIGN.md
// "A broker group owns its marker role"): the reconciler drops every
// member of the marker role its own store does not know, so two groups
// (two brokerd with their own bbolt files, blue/green, staging beside
// production) sharing one marker role on one cluster would drop each
// other's users. The owner is recorded in the marker role's comment,
// written once when a group first claims the role:
//
//	COMMENT ON ROLE credbroker_managed IS 'credbroker group <group id>'
//
// The comment lives in the cluster (pg_shdescription), beside the role it
// is about, so every database of the cluster sees it, it needs no table
// of the broker's own, and a DBA can read it with \drg+ or \du+.
//
// What a claim decides, given the comment it finds:
//   - this group's claim: the group owns the role (a restart, or another
//     instance of the group);
//   - no comment (a new marker role, or one from before claims existed):
//     the group claims it. Claiming an unclaimed role of an older install
//     is safe for the usual case, one broker per marker role; where two
//     groups already shared one, the first to start with this version
//     claims it and the second refuses to start, which ends the drops;
//   - anything else (another group's claim, or a comment a DBA wrote):
//     ErrMarkerOwned, naming the role and the fix. A comment that is not
//     a claim is not taken over, since it says someone uses the role for
//     something; an operator who retired the owning group clears it
//     (COMMENT ON ROLE ... IS NULL) to hand the role over.
const markerClaimPrefix = "credbroker group "

// markerCommentQuery reads the comment of the role $1 ("" when none).
const markerCommentQuery = `
	SELECT coalesce(shobj_description(oid, 'pg_authid'), '') FROM pg_roles WHERE rolname = $1`

// claimLockSQL serializes claims of the marker role across the whole
// cluster: ALTER ROLE rewrites the role's row in the shared catalog, so a
// concurrent claim's ALTER ROLE waits for this transaction and then fails
// ("tuple concurrently updated") instead of reading a comment that is
// about to change. Advisory locks would not do: they are per database,
// and two groups may use two databases of one cluster. NOLOGIN is what
// the marker role must be anyway (ensureMarker checks it).
func claimLockSQL(marker string) string { return "ALTER ROLE " + quoteIdent(marker) + " NOLOGIN" }

// claimSQL records group as the marker role's owner.
func claimSQL(marker, group string) string {
	return "COMMENT ON ROLE " + quoteIdent(marker) + " IS " + quoteLiteral(markerClaimPrefix+group)
}

// claimAttempts bounds the retries of a claim that lost a race with a
// concurrent one; the retry reads the winner's claim first.
const claimAttempts = 5

// claimMarker makes sure group owns the marker role, claiming it if no
// one does (see above). A role owned by another group is ErrMarkerOwned.
// After the first claim it is one read, so the broker calls it before
// every reconciliation, not only at start-up.
func (e *engine) claimMarker(ctx context.Context, group string) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	if err := broker.ValidateLeaseID(group); err != nil { // broker.NewGroupID's shape
		return invalid("broker group id", err)
	}
	var err error
	for range claimAttempts {
		// Read again after a lost race: the claim that won committed
		// before this one's ALTER ROLE failed, so its comment is there
		// (a transaction commits ALTER ROLE only as a claim, or after
		// it saw a claim).
		var comment string
		if err := e.pool.QueryRow(ctx, markerCommentQuery, e.marker).Scan(&comment); err != nil {
			return fmt.Errorf("postgres: reading the owner of marker role %q: %w", e.marker, err)
		}
		if comment != "" {
			return e.checkClaim(comment, group)
		}
		claimed := false
		err = pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, claimLockSQL(e.marker)); err != nil {
				return err
			}
			if err := tx.QueryRow(ctx, markerCommentQuery, e.marker).Scan(&comment); err != nil {
				return err
			}
			if comment != "" {
				return nil // claimed meanwhile: checked below
			}
			claimed = true
			_, err := tx.Exec(ctx, claimSQL(e.marker, group))
			return err
		})
		if err == nil && claimed {
			e.log.Info("claimed the marker role for this broker group", "marker_role", e.marker, "group", group)
			return nil
		}
		if err == nil {
			return e.checkClaim(comment, group)
		}
		if !concurrentlyUpdated(err) {
			break
		}
	}
	return fmt.Errorf("postgres: claiming marker role %q for this broker group: %w", e.marker, err)
}

// checkClaim accepts the marker role's comment if it is group's claim.
func (e *engine) checkClaim(comment, group string) error {
	if comment == markerClaimPrefix+group {
		return nil
	}
	if len(comment) > 100 {
		comment = comment[:100] + "..."
	}
	fix := fmt.Sprintf("give this broker group a marker role of its own (targets[].marker_role, e.g. %q); "+
		"only if the owner is retired and none of its users is live, hand the role over with COMMENT ON ROLE %s IS NULL",
		e.marker+"_2", quoteIdent(e.marker))
	if owner, ok := strings.CutPrefix(comment, markerClaimPrefix); ok {
		return markerOwnedError(fmt.Sprintf("postgres: marker role %q is owned by another broker group (%s), whose users this broker would drop as unknown: %s",
			e.marker, owner, fix))
	}
	return markerOwnedError(fmt.Sprintf("postgres: marker role %q has a comment that is not this broker group's claim (%q), so something else may use it: %s",
		e.marker, comment, fix))
}

// markerOwnedError is broker.ErrMarkerOwned with a message of its own (the
// sentinel's text would only repeat it).
type markerOwnedError string

func (e markerOwnedError) Error() string        { return string(e) }
func (e markerOwnedError) Is(target error) bool { return target == broker.ErrMarkerOwned }

// concurrentlyUpdated is the error of a claim that lost the race on the
// marker role's catalog row (claimLockSQL).
func concurrentlyUpdated(err error) bool {
	var pgErr interface{ SQLState() string }
	return errors.As(err, &pgErr) && pgErr.SQLState() == "XX000" && strings.Contains(err.Error(), "concurrently updated")
}
