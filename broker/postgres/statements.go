package postgres

import (
	"strings"
	"time"
)

// Every statement the engine sends, each shape once. Names are validated
// before they get here and quoted here; instants are formatted here: the
// role statements take no bind parameters (see CreateUserSQL), so a
// builder is the only place a value enters their text. The queries take
// bind parameters wherever PostgreSQL allows them.
//
// The exported builders are what cmd/credbroker-bench's baseline sends,
// so its ceiling is measured with the engine's own statements.

// CreateUserSQL is NewUser's statement for one user: a LOGIN role with
// the SCRAM verifier as its password, VALID UNTIL validUntil, member of
// proxy and marker, whose sessions start as proxy (so what it creates
// belongs to proxy). It is two statements in one simple-protocol query,
// which the server runs as one implicit transaction in one round trip.
func CreateUserSQL(user, proxy, marker, verifier string, validUntil time.Time) string {
	u, p := quoteIdent(user), quoteIdent(proxy)
	return "CREATE ROLE " + u + " LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS" +
		" PASSWORD " + quoteLiteral(verifier) +
		" VALID UNTIL " + quoteLiteral(pgTime(validUntil)) +
		" IN ROLE " + p + ", " + quoteIdent(marker) +
		"; ALTER ROLE " + u + " SET role = " + p
}

// RenewUserSQL moves one user's VALID UNTIL (RenewUser; RenewUsers joins
// several with "; ").
func RenewUserSQL(user string, validUntil time.Time) string {
	return "ALTER ROLE " + quoteIdent(user) + " VALID UNTIL " + quoteLiteral(pgTime(validUntil))
}

// DropUsersSQL is the last step of DeleteUser and DeleteUsers: the users
// go, and a user already gone is no error.
func DropUsersSQL(users ...string) string {
	return "DROP ROLE IF EXISTS " + quoteIdents(users)
}

// pgTime formats an instant for VALID UNTIL: UTC with an explicit offset,
// which every server time zone setting parses the same way.
func pgTime(t time.Time) string {
	return t.UTC().Format("2006-01-02 15:04:05.999999-07:00")
}

func quoteIdents(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = quoteIdent(n)
	}
	return strings.Join(q, ", ")
}

// BlockLoginsSQL is DeleteUser's first step for one user: no more
// logins, and the admin gets the user's privileges, which ending its
// sessions before PostgreSQL 16 and REASSIGN/DROP OWNED on every version
// require. A user granted already (made by an older broker) only draws a
// NOTICE.
func BlockLoginsSQL(user, admin string) string {
	return "ALTER ROLE " + quoteIdent(user) + " NOLOGIN; GRANT " + quoteIdent(user) + " TO " + quoteIdent(admin)
}

// DisownSQL hands what the users own to proxy and drops their remaining
// objects and privileges; with proxy "" everything they own is dropped.
// DeleteUser sends it only in the databases where pg_shdepend says the
// users own something or hold a privilege (see endSessionsQuery).
func DisownSQL(users []string, proxy string) string {
	list := quoteIdents(users)
	if proxy == "" {
		return "DROP OWNED BY " + list
	}
	return "REASSIGN OWNED BY " + list + " TO " + quoteIdent(proxy) + "; DROP OWNED BY " + list
}

// createMarkerSQL creates the marker role (New, and AdminSetupSQL).
func createMarkerSQL(marker string) string {
	return "CREATE ROLE " + quoteIdent(marker) + " NOLOGIN"
}

// grantWithAdminSQL lets admin grant role to the users it creates.
func grantWithAdminSQL(role, admin string) string {
	return "GRANT " + quoteIdent(role) + " TO " + quoteIdent(admin) + " WITH ADMIN OPTION"
}

// managedRole is true for a role r the broker made, given the marker role
// g: a plain member of g (one that does not hold ADMIN OPTION on it, as
// the admin does), and not privileged. Every query that decides whether a
// role is the broker's to alter or drop uses it; a corrupted lease must
// never touch anyone else.
const managedRole = `
	EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid AND m.roleid = g.oid)
	AND NOT EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid AND m.roleid = g.oid AND m.admin_option)
	AND NOT (r.rolsuper OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls)`

// Queries, with their bind parameters.
const (
	// adminQuery reads the server version and the admin role's attributes.
	adminQuery = `
		SELECT current_setting('server_version_num')::int, current_user, rolsuper, rolcreaterole
		FROM pg_roles WHERE rolname = current_user`

	// roleQuery reads what the engine checks about a proxy or marker role
	// ($1).
	roleQuery = `
		SELECT rolcanlogin, rolsuper,
		       pg_has_role(current_user, oid, 'USAGE'),
		       pg_has_role(current_user, oid, 'MEMBER WITH ADMIN OPTION')
		FROM pg_roles WHERE rolname = $1`

	// managedQuery names each of the roles $1 that exists and says
	// whether it is the broker's (managedRole), given the marker role $2.
	managedQuery = `
		SELECT r.rolname::text, ` + managedRole + `
		FROM pg_roles r, pg_roles g
		WHERE r.rolname = ANY($1) AND g.rolname = $2`

	// listManagedQuery lists the broker's users, given the marker role $1.
	listManagedQuery = `
		SELECT r.rolname::text
		FROM pg_roles r, pg_roles g
		WHERE g.rolname = $1 AND ` + managedRole + `
		ORDER BY 1`

	// TerminateQuery ends every session of the users $1 and counts the
	// sessions it signalled (the second step of DeleteUser, which the
	// bench's baseline sends too).
	TerminateQuery = `
		SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = ANY($1)`

	// endSessionsQuery is TerminateQuery, and in the same round trip what
	// step 3 needs to know, from pg_shdepend: the catalog DROP ROLE itself
	// consults, which lists every object a role owns (deptype o, including
	// its default privileges, pg_default_acl), every object whose ACL
	// names it as grantee or grantor (a, including default privileges
	// granted to it), every row-level security policy naming it (r), and
	// every initial privilege naming it (i), per database, with dbid 0 for
	// shared objects (databases, tablespaces, parameters). A role without
	// a row there needs neither REASSIGN OWNED nor DROP OWNED anywhere.
	// Columns: the sessions signalled; the users $1 with rows in the
	// current database or on shared objects (what REASSIGN/DROP OWNED run
	// here settle: DROP OWNED revokes privileges on shared objects too);
	// the users, database names and datallowconn of rows in other
	// databases (three arrays, in step); and how many of the proxy roles
	// $2 the admin has the privileges of (REASSIGN OWNED ... TO needs
	// them).
	endSessionsQuery = `
		WITH dep AS (
			SELECT DISTINCT r.rolname::text AS u, s.dbid
			FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid
			WHERE s.refclassid = 'pg_authid'::regclass AND r.rolname = ANY($1)
		), other AS (
			SELECT dep.u, d.datname::text AS db, d.datallowconn AS allow
			FROM dep JOIN pg_database d ON d.oid = dep.dbid
			WHERE d.datname <> current_database()
		)
		SELECT (SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = ANY($1)),
		       ARRAY(SELECT DISTINCT dep.u FROM dep
		             WHERE dep.dbid = 0 OR dep.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())),
		       ARRAY(SELECT u FROM other ORDER BY u, db),
		       ARRAY(SELECT db FROM other ORDER BY u, db),
		       ARRAY(SELECT allow FROM other ORDER BY u, db),
		       (SELECT count(*) FROM pg_roles WHERE rolname = ANY($2) AND pg_has_role(current_user, oid, 'USAGE'))`

	// roleSettingQuery reads the proxy role NewUser recorded in the user
	// $1's SET role setting.
	roleSettingQuery = `
		SELECT substr(c, 6) FROM pg_roles r, unnest(r.rolconfig) c
		WHERE r.rolname = $1 AND c LIKE 'role=%' LIMIT 1`

	// sessionsQuery lists the open sessions of the broker's users, given
	// the marker role $1. Without pg_read_all_stats PostgreSQL returns
	// NULL for backend_start, client_addr, query_start and backend_type
	// of another role's session (so the parallel workers it would filter
	// out are then counted too, for as long as they run).
	sessionsQuery = `
		SELECT r.rolname::text, a.pid, a.backend_start, coalesce(a.application_name, ''),
		       coalesce(host(a.client_addr), ''), a.query_start
		FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid, pg_roles g
		WHERE g.rolname = $1 AND coalesce(a.backend_type, 'client backend') = 'client backend'
		  AND ` + managedRole + `
		ORDER BY 1, 2`

	// usableQuery says whether the admin has the privileges of role $1.
	usableQuery = `
		SELECT pg_has_role(current_user, oid, 'USAGE') FROM pg_roles WHERE rolname = $1`
)
