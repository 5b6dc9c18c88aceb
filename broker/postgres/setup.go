package postgres

import (
	"fmt"
	"time"
)

// Defaults of a target's settings (Config; targets[] in brokerd's
// configuration).
const (
	// DefaultMarkerRole is the marker role's name when none is configured.
	DefaultMarkerRole = "credbroker_managed"
	// DefaultMaxConns is the admin connection pool's size.
	DefaultMaxConns = 10
	// DefaultConnectTimeout bounds one connection attempt when neither
	// the configuration nor the URL's connect_timeout says.
	DefaultConnectTimeout = 10 * time.Second
)

// SetupParams name the roles of AdminSetupSQL.
type SetupParams struct {
	// Admin is the role the broker connects as (created LOGIN CREATEROLE).
	Admin string
	// AdminPassword, if set, becomes the admin's password, as a SCRAM
	// verifier; it must pass ValidPassword. Empty: no password clause (set
	// one later with psql's \password, which also hashes client-side).
	AdminPassword string
	// ProxyRoles are the existing NOLOGIN roles issued users inherit.
	ProxyRoles []string
	// MarkerRole is created NOLOGIN; "" is DefaultMarkerRole.
	MarkerRole string
	// ServerVersion is the server's major version. The recipe is the same
	// for 13 through 18 today (see AdminSetupSQL); the field keeps the
	// signature stable for a future major that needs different grants.
	ServerVersion int
}

// AdminSetupSQL returns the statements a superuser runs once to create the
// broker's admin role with the minimal grants it needs, one statement per
// element (the README prints them; the tests and `brokerd dev` run them).
// The proxy roles must already exist. It fails if AdminPassword is set but
// fails ValidPassword.
//
// Why each grant, as checked on PostgreSQL 15 and 17:
//
//   - CREATEROLE: to create, alter and drop the issued users.
//   - GRANT <proxy> TO admin WITH ADMIN OPTION: PostgreSQL 16+ requires ADMIN
//     OPTION on a role to put a new user IN it. On 13-15 CREATEROLE alone may
//     grant any non-superuser role, but REASSIGN OWNED ... TO <proxy> (when a
//     user is dropped) requires the admin to have the privileges of <proxy>,
//     i.e. be a member on every version. ADMIN OPTION adds no power there
//     beyond CREATEROLE, and keeps the broker working after pg_upgrade to 16+.
//   - GRANT <marker> TO admin WITH ADMIN OPTION: as for proxy roles (16+).
//     Because of this grant the admin is itself a member of the marker role;
//     Engine never counts a member holding ADMIN OPTION as a managed user.
//   - GRANT pg_signal_backend TO admin: to end an issued user's sessions on
//     16+. On 13-15 the admin may already signal them, being a member of each
//     user it drops (the engine grants the user to the admin in the
//     transaction that blocks its logins), so it is a safety net there.
//
// The admin inherits the proxy roles' privileges; it can already obtain
// them by issuing itself a user, so this grants nothing new.
func AdminSetupSQL(p SetupParams) ([]string, error) {
	marker := p.MarkerRole
	if marker == "" {
		marker = DefaultMarkerRole
	}
	admin := quoteIdent(p.Admin)
	create := "CREATE ROLE " + admin + " LOGIN CREATEROLE NOSUPERUSER NOCREATEDB NOREPLICATION NOBYPASSRLS"
	if p.AdminPassword != "" {
		v, err := ScramSHA256Verifier(p.AdminPassword)
		if err != nil {
			return nil, fmt.Errorf("postgres: admin password: %w", err)
		}
		create += " PASSWORD " + quoteLiteral(v)
	}
	stmts := []string{
		createMarkerSQL(marker),
		create,
	}
	for _, r := range p.ProxyRoles {
		stmts = append(stmts, grantWithAdminSQL(r, p.Admin))
	}
	stmts = append(stmts,
		grantWithAdminSQL(marker, p.Admin),
		"GRANT pg_signal_backend TO "+admin,
	)
	return stmts, nil
}
