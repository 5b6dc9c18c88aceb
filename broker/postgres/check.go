package postgres

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker/privcheck"
)

// readOnlyName matches role names that promise read-only access.
var readOnlyName = regexp.MustCompile(`(?i)(read[_-]?only|readonly|(^|[_-])ro($|[_-])|reader|viewer)`)

// writePrivileges are the privileges a read-only role must not hold.
var writePrivileges = map[string]bool{
	"INSERT": true, "UPDATE": true, "DELETE": true, "TRUNCATE": true,
	"TRIGGER": true, "REFERENCES": true, "CREATE": true, "OWNER": true,
	"MAINTAIN": true, // 17+
}

// allTablePrivileges is what GRANT ALL gives on a table before 17
// (17 adds MAINTAIN, which the check also accepts as part of ALL).
var allTablePrivileges = []string{"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}

// predefinedRisk are PostgreSQL's predefined roles that give powers no
// ACL shows.
var predefinedRisk = map[string]struct {
	severity privcheck.Severity
	why      string
}{
	"pg_execute_server_program": {privcheck.SeverityCritical, "issued users can run programs on the database server"},
	"pg_write_server_files":     {privcheck.SeverityCritical, "issued users can write files on the database server"},
	"pg_read_server_files":      {privcheck.SeverityHigh, "issued users can read files on the database server"},
	"pg_write_all_data":         {privcheck.SeverityHigh, "issued users can write every table"},
	"pg_read_all_data":          {privcheck.SeverityMedium, "issued users can read every table"},
	"pg_signal_backend":         {privcheck.SeverityMedium, "issued users can end other sessions"},
	"pg_create_subscription":    {privcheck.SeverityMedium, "issued users can create subscriptions"},
}

// privilege is one privilege a role holds, directly or through a role it
// belongs to.
type privilege struct {
	kind, object, priv string
	via                string // the role whose grant it is
}

// CheckPrivileges reads the catalog of the target (its cluster-wide roles
// and the objects of the admin's database) and reports the article's
// pitfalls for the configured proxy roles and for the broker's own admin
// role: roles that can log in or carry SUPERUSER / CREATEROLE / CREATEDB /
// BYPASSRLS / REPLICATION (themselves or through a role they belong to,
// which an issued user may SET ROLE to); GRANT ALL; write privileges on a
// role named read-only; two proxy roles with identical privileges; and an
// admin that is a superuser, with the SQL that replaces it by the minimal
// grants. Findings are sorted, most severe first.
func (e *engine) CheckPrivileges(ctx context.Context, uses []privcheck.ProxyRoleUse) ([]privcheck.Finding, error) {
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	var out []privcheck.Finding
	admin, err := e.checkAdmin(ctx, uses)
	if err != nil {
		return nil, e.sanitize(ctx, err)
	}
	out = append(out, admin...)

	brokerRoles := map[string][]string{}
	var proxies []string
	for _, u := range uses {
		if _, seen := brokerRoles[u.ProxyRole]; !seen {
			proxies = append(proxies, u.ProxyRole)
		}
		brokerRoles[u.ProxyRole] = append(brokerRoles[u.ProxyRole], u.BrokerRole)
	}
	sets := map[string]string{} // proxy -> canonical privilege set
	for _, proxy := range proxies {
		if err := ValidIdentifier(proxy); err != nil {
			return nil, invalid("proxy role", err)
		}
		f, set, err := e.checkProxy(ctx, proxy, brokerRoles[proxy])
		if err != nil {
			return nil, e.sanitize(ctx, fmt.Errorf("postgres: checking proxy role %q: %w", proxy, err))
		}
		out = append(out, f...)
		if set != "" {
			sets[proxy] = set
		}
	}
	out = append(out, overlaps(proxies, sets)...)
	privcheck.SortFindings(out)
	return out, nil
}

// attributes of a role, or of a role it belongs to (via names it).
type attributes struct {
	role                                          string
	via                                           string
	login, super, createRole, createDB, bypassRLS bool
	replication                                   bool
	exists                                        bool
}

// roleAttributes returns the attributes of name and of every role it is a
// member of, directly or not. Membership counts whatever its INHERIT
// option: an issued user can SET ROLE to any of them.
func (e *engine) roleAttributes(ctx context.Context, name string) ([]attributes, error) {
	rows, err := e.pool.Query(ctx, `
		WITH RECURSIVE up(oid, via) AS (
			SELECT oid, NULL::name FROM pg_roles WHERE rolname = $1
			UNION
			SELECT m.roleid, COALESCE(up.via, g.rolname)
			FROM up JOIN pg_auth_members m ON m.member = up.oid
			JOIN pg_roles g ON g.oid = m.roleid
		)
		SELECT r.rolname, COALESCE(up.via, ''), r.rolcanlogin, r.rolsuper, r.rolcreaterole,
		       r.rolcreatedb, r.rolbypassrls, r.rolreplication
		FROM up JOIN pg_roles r ON r.oid = up.oid
		ORDER BY up.via IS NOT NULL, r.rolname`, name)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (attributes, error) {
		a := attributes{exists: true}
		return a, r.Scan(&a.role, &a.via, &a.login, &a.super, &a.createRole, &a.createDB, &a.bypassRLS, &a.replication)
	})
}

// rolePrivileges lists the privileges granted to name or to a role it
// belongs to (not to PUBLIC: every role has those), on the objects of the
// admin's database and on that database itself, plus ownership.
func (e *engine) rolePrivileges(ctx context.Context, name string) ([]privilege, error) {
	rows, err := e.pool.Query(ctx, `
		WITH RECURSIVE up(oid) AS (
			SELECT oid FROM pg_roles WHERE rolname = $1
			UNION
			SELECT m.roleid FROM up JOIN pg_auth_members m ON m.member = up.oid
		),
		rels AS (
			SELECT c.oid, c.relkind, c.relowner, c.relacl, c.oid::regclass::text AS object
			FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
			  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
		)
		SELECT CASE WHEN rels.relkind = 'S' THEN 'sequence' ELSE 'table' END, rels.object, a.privilege_type, g.rolname
		FROM rels, aclexplode(rels.relacl) a, pg_roles g
		WHERE a.grantee IN (SELECT oid FROM up) AND g.oid = a.grantee
		UNION ALL
		SELECT 'column', c.oid::regclass::text || '.' || quote_ident(att.attname), a.privilege_type, g.rolname
		FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid, aclexplode(att.attacl) a, pg_roles g
		WHERE att.attacl IS NOT NULL AND a.grantee IN (SELECT oid FROM up) AND g.oid = a.grantee
		UNION ALL
		SELECT CASE WHEN rels.relkind = 'S' THEN 'sequence' ELSE 'table' END, rels.object, 'OWNER', g.rolname
		FROM rels JOIN pg_roles g ON g.oid = rels.relowner
		WHERE rels.relowner IN (SELECT oid FROM up)
		UNION ALL
		SELECT 'schema', quote_ident(n.nspname), a.privilege_type, g.rolname
		FROM pg_namespace n, aclexplode(n.nspacl) a, pg_roles g
		WHERE a.grantee IN (SELECT oid FROM up) AND g.oid = a.grantee
		UNION ALL
		SELECT 'schema', quote_ident(n.nspname), 'OWNER', g.rolname
		FROM pg_namespace n JOIN pg_roles g ON g.oid = n.nspowner
		WHERE n.nspowner IN (SELECT oid FROM up)
		UNION ALL
		SELECT 'function', p.oid::regprocedure::text, a.privilege_type, g.rolname
		FROM pg_proc p, aclexplode(p.proacl) a, pg_roles g
		WHERE a.grantee IN (SELECT oid FROM up) AND g.oid = a.grantee
		UNION ALL
		SELECT 'database', quote_ident(d.datname), a.privilege_type, g.rolname
		FROM pg_database d, aclexplode(d.datacl) a, pg_roles g
		WHERE d.datname = current_database() AND a.grantee IN (SELECT oid FROM up) AND g.oid = a.grantee
		ORDER BY 1, 2, 3, 4`, name)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (privilege, error) {
		var p privilege
		return p, r.Scan(&p.kind, &p.object, &p.priv, &p.via)
	})
}

// checkProxy returns the findings about one proxy role and its privilege
// set in canonical form ("" when it has none or does not exist).
func (e *engine) checkProxy(ctx context.Context, proxy string, brokerRoles []string) ([]privcheck.Finding, string, error) {
	q := quoteIdent(proxy)
	used := "broker role " + strings.Join(brokerRoles, ", ")
	attrs, err := e.roleAttributes(ctx, proxy)
	if err != nil {
		return nil, "", err
	}
	if len(attrs) == 0 {
		return []privcheck.Finding{{
			Severity: privcheck.SeverityHigh, Check: privcheck.CheckProxyMissing, Role: proxy,
			Message: fmt.Sprintf("proxy role of %s does not exist: every issue fails", used),
			Fix:     "CREATE ROLE " + q + " NOLOGIN; -- then grant it exactly what " + used + " needs",
		}}, "", nil
	}
	var out []privcheck.Finding
	for _, a := range attrs {
		where, fixRole := "", q
		if a.via != "" {
			where = fmt.Sprintf(" through its membership in %q", a.via)
			fixRole = quoteIdent(a.role)
		}
		if a.via == "" && a.login {
			out = append(out, privcheck.Finding{
				Severity: privcheck.SeverityHigh, Check: privcheck.CheckProxyLogin, Role: proxy,
				Message: "proxy role can log in; proxy roles are NOLOGIN, only the short-lived users the broker issues log in",
				Fix:     "ALTER ROLE " + q + " NOLOGIN",
			})
		}
		for _, attr := range []struct {
			on       bool
			name     string
			severity privcheck.Severity
			why      string
		}{
			{a.super, "SUPERUSER", privcheck.SeverityCritical, "every issued user can do anything"},
			{a.createRole, "CREATEROLE", privcheck.SeverityCritical, "issued users can create roles and grant themselves more"},
			{a.bypassRLS, "BYPASSRLS", privcheck.SeverityHigh, "issued users ignore row-level security"},
			{a.replication, "REPLICATION", privcheck.SeverityHigh, "issued users can stream the whole cluster's data"},
			{a.createDB, "CREATEDB", privcheck.SeverityMedium, "issued users can create databases"},
		} {
			if !attr.on {
				continue
			}
			subject := "proxy role"
			if a.via != "" {
				subject = fmt.Sprintf("proxy role belongs to %q, which", a.role)
			}
			out = append(out, privcheck.Finding{
				Severity: attr.severity, Check: privcheck.CheckProxyAttribute, Role: proxy,
				Message: fmt.Sprintf("%s has %s%s: %s", subject, attr.name, where, attr.why),
				Fix:     "ALTER ROLE " + fixRole + " NO" + attr.name,
			})
		}
	}

	for _, a := range attrs {
		if d, ok := predefinedRisk[a.role]; ok && a.via != "" {
			out = append(out, privcheck.Finding{
				Severity: d.severity, Check: privcheck.CheckProxyAttribute, Role: proxy,
				Message: fmt.Sprintf("proxy role belongs to the predefined role %q: %s", a.role, d.why),
				Fix:     "REVOKE " + quoteIdent(a.via) + " FROM " + q,
			})
		}
	}

	privs, err := e.rolePrivileges(ctx, proxy)
	if err != nil {
		return nil, "", err
	}
	readOnly := readOnlyName.MatchString(proxy)
	for _, br := range brokerRoles {
		readOnly = readOnly || readOnlyName.MatchString(br)
	}
	type object struct{ kind, name string }
	byObject := map[object]map[string]string{} // privilege -> granted to
	var objects []object
	for _, p := range privs {
		o := object{p.kind, p.object}
		if byObject[o] == nil {
			byObject[o] = map[string]string{}
			objects = append(objects, o)
		}
		byObject[o][p.priv] = p.via
	}
	var set []string
	for _, o := range objects {
		held := byObject[o]
		names := make([]string, 0, len(held))
		for p := range held {
			names = append(names, p)
		}
		sort.Strings(names)
		set = append(set, o.kind+" "+o.name+": "+strings.Join(names, ","))

		all := o.kind == "table" && held["OWNER"] == ""
		for _, p := range allTablePrivileges {
			all = all && held[p] != ""
		}
		var writes []string
		for _, p := range names {
			if writePrivileges[p] {
				writes = append(writes, p)
			}
		}
		switch {
		case all && readOnly:
			out = append(out, privcheck.Finding{
				Severity: privcheck.SeverityCritical, Check: privcheck.CheckReadOnlyWrites, Role: proxy,
				Message: fmt.Sprintf("read-only role holds ALL privileges on %s %s%s", o.kind, o.name, viaText(held, proxy)),
				Fix:     fmt.Sprintf("REVOKE ALL ON %s FROM %s; GRANT SELECT ON %[1]s TO %[2]s", o.name, quoteIdent(firstVia(held, proxy))),
			})
		case all:
			out = append(out, privcheck.Finding{
				Severity: privcheck.SeverityMedium, Check: privcheck.CheckProxyGrantAll, Role: proxy,
				Message: fmt.Sprintf("holds ALL privileges on %s %s%s; grant only what %s needs", o.kind, o.name, viaText(held, proxy), used),
				Fix:     fmt.Sprintf("REVOKE ALL ON %s FROM %s; -- then GRANT the privileges needed", o.name, quoteIdent(firstVia(held, proxy))),
			})
		case readOnly && len(writes) > 0:
			fix := fmt.Sprintf("REVOKE %s ON %s %s FROM %s", strings.Join(writes, ", "), sqlObjectKind(o.kind), o.name, quoteIdent(firstVia(held, proxy)))
			if slices.Contains(writes, "OWNER") {
				fix = fmt.Sprintf("ALTER %s %s OWNER TO <another role>", strings.ToUpper(sqlObjectKind(o.kind)), o.name)
			}
			out = append(out, privcheck.Finding{
				Severity: privcheck.SeverityHigh, Check: privcheck.CheckReadOnlyWrites, Role: proxy,
				Message: fmt.Sprintf("read-only role may %s on %s %s%s", strings.Join(writes, ", "), o.kind, o.name, viaText(held, proxy)),
				Fix:     fix,
			})
		}
	}
	if len(set) == 0 {
		out = append(out, privcheck.Finding{
			Severity: privcheck.SeverityLow, Check: privcheck.CheckNoPrivileges, Role: proxy,
			Message: fmt.Sprintf("proxy role of %s holds no privileges in database %q: issued users can do nothing useful", used, e.endpoint.Database),
		})
		return out, "", nil
	}
	return out, strings.Join(set, "\n"), nil
}

func sqlObjectKind(kind string) string {
	switch kind {
	case "column":
		return "TABLE" // column privileges are revoked with REVOKE priv (col) ON TABLE; close enough as a hint
	case "sequence", "schema", "function", "database":
		return strings.ToUpper(kind)
	}
	return "TABLE"
}

// viaText names the role a grant came through when it is not the proxy
// role itself.
func viaText(held map[string]string, proxy string) string {
	if v := firstVia(held, proxy); v != proxy {
		return fmt.Sprintf(" (granted to %q, which it belongs to)", v)
	}
	return ""
}

func firstVia(held map[string]string, proxy string) string {
	var vias []string
	for _, v := range held {
		if v == proxy {
			return proxy
		}
		vias = append(vias, v)
	}
	sort.Strings(vias)
	if len(vias) == 0 {
		return proxy
	}
	return vias[0]
}

// overlaps reports proxy roles with identical, non-empty privilege sets.
func overlaps(proxies []string, sets map[string]string) []privcheck.Finding {
	var out []privcheck.Finding
	for i, a := range proxies {
		for _, b := range proxies[i+1:] {
			if sa, ok := sets[a]; ok && sa == sets[b] {
				out = append(out, privcheck.Finding{
					Severity: privcheck.SeverityMedium, Check: privcheck.CheckOverlap, Role: a,
					Message: fmt.Sprintf("proxy roles %q and %q hold identical privileges; "+
						"two names for the same access hide who can do what", a, b),
					Fix: "merge the broker roles onto one proxy role, or narrow one of them",
				})
			}
		}
	}
	return out
}

// checkAdmin reports an admin role that is a superuser (with the SQL that
// gives it the minimal grants instead) or holds attributes it never uses.
func (e *engine) checkAdmin(ctx context.Context, uses []privcheck.ProxyRoleUse) ([]privcheck.Finding, error) {
	var super, createDB, bypassRLS, replication bool
	err := e.pool.QueryRow(ctx, `
		SELECT rolsuper, rolcreatedb, rolbypassrls, rolreplication FROM pg_roles WHERE rolname = current_user`).
		Scan(&super, &createDB, &bypassRLS, &replication)
	if err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("postgres: the admin role %q is not in pg_roles", e.admin)
		}
		return nil, fmt.Errorf("postgres: reading the admin role: %w", err)
	}
	admin := quoteIdent(e.admin)
	var out []privcheck.Finding
	if super {
		var proxies []string
		for _, u := range uses {
			if !slices.Contains(proxies, u.ProxyRole) {
				proxies = append(proxies, u.ProxyRole)
			}
		}
		fix := MinimalGrantsSQL(e.admin, e.marker, proxies)
		out = append(out, privcheck.Finding{
			Severity: privcheck.SeverityHigh, Check: privcheck.CheckAdminSuperuser, Role: e.admin,
			Message: "the broker's admin role is a superuser; it needs only CREATEROLE and a few grants, " +
				"and a leaked admin password would give away the whole cluster",
			Fix: strings.Join(fix, ";\n") + ";",
		})
		return out, nil
	}
	for _, attr := range []struct {
		on   bool
		name string
	}{{createDB, "CREATEDB"}, {bypassRLS, "BYPASSRLS"}, {replication, "REPLICATION"}} {
		if attr.on {
			out = append(out, privcheck.Finding{
				Severity: privcheck.SeverityMedium, Check: privcheck.CheckAdminAttributes, Role: e.admin,
				Message: fmt.Sprintf("the broker's admin role has %s, which the broker never uses", attr.name),
				Fix:     "ALTER ROLE " + admin + " NO" + attr.name,
			})
		}
	}
	return out, nil
}

// MinimalGrantsSQL is what a superuser runs to turn an existing admin role
// into the minimal one AdminSetupSQL would have created: the same grants,
// on a role that already exists. Run it as another superuser.
func MinimalGrantsSQL(admin, marker string, proxyRoles []string) []string {
	if marker == "" {
		marker = DefaultMarkerRole
	}
	a := quoteIdent(admin)
	stmts := []string{"ALTER ROLE " + a + " NOSUPERUSER CREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS"}
	for _, p := range proxyRoles {
		stmts = append(stmts, "GRANT "+quoteIdent(p)+" TO "+a+" WITH ADMIN OPTION")
	}
	return append(stmts,
		"GRANT "+quoteIdent(marker)+" TO "+a+" WITH ADMIN OPTION",
		"GRANT pg_signal_backend TO "+a,
	)
}
