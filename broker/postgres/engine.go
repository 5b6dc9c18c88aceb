package postgres

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/credbroker/credbroker/broker"
)

// minServerVersion is the oldest PostgreSQL the engine supports (as
// server_version_num).
const minServerVersion = 130000

// Config configures an Engine for one target.
type Config struct {
	// URL is the admin connection, postgres://user@host:port/database. It
	// must not hold a password: secrets live in a password file, not in
	// configuration that gets printed and copied.
	URL string
	// Password is the admin's password (read by the caller from its
	// password_file or environment).
	Password string
	// MarkerRole marks the users the broker creates; "" is
	// DefaultMarkerRole.
	MarkerRole string
	// MaxConns caps the connection pool; 0 is DefaultMaxConns.
	MaxConns int32
	// ConnectTimeout bounds each connection attempt; 0 is the URL's
	// connect_timeout, else DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// TerminateTimeout bounds how long DeleteUser waits for the user's
	// sessions to end; 0 is 10s.
	TerminateTimeout time.Duration
	// ScramIterations is the iteration count of the SCRAM-SHA-256
	// verifiers of issued users' passwords; 0 is DefaultScramIterations.
	// New refuses a count outside ValidScramIterations.
	ScramIterations int
	// Logger receives operational messages (never a password); nil
	// discards them.
	Logger *slog.Logger
}

// engine creates and drops users on one PostgreSQL cluster as a
// non-superuser admin role. It is safe for concurrent use. Its errors may
// carry secrets: only Engine, which redacts them, is handed out.
type engine struct {
	pool             *pgxpool.Pool
	admin            string // current_user of the pool's connections
	marker           string
	version          int // server_version_num, e.g. 150018
	endpoint         broker.Endpoint
	terminateTimeout time.Duration
	scramIterations  int
	log              *slog.Logger
	secrets          []string // the admin URL and password New was given
	closed           atomic.Bool
	managed          managedCache // users known to be the broker's (renewals.go)
	// ownershipHook, set by tests only, edits what endSessions read from
	// the catalog (to make it miss an object, as a race would).
	ownershipHook func(*ownership)

	// password is the admin password new connections use; SetPassword and
	// RotatePassword change it (see rotate.go). Every value it ever held
	// is redacted from errors.
	password  atomic.Pointer[string]
	secretsMu sync.Mutex
	oldSecret []string
}

// newEngine connects to the target, checks the server version and the
// admin role, and makes sure the marker role exists (creating it if the
// admin may).
func newEngine(ctx context.Context, cfg Config) (*engine, error) {
	if cfg.MarkerRole == "" {
		cfg.MarkerRole = DefaultMarkerRole
	}
	if err := ValidIdentifier(cfg.MarkerRole); err != nil {
		return nil, fmt.Errorf("postgres: marker role: %w", err)
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.TerminateTimeout <= 0 {
		cfg.TerminateTimeout = 10 * time.Second
	}
	if cfg.ScramIterations == 0 {
		cfg.ScramIterations = DefaultScramIterations
	}
	if err := ValidScramIterations(cfg.ScramIterations); err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	pc, err := parseAdminURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	pc.ConnConfig.Password = cfg.Password
	if pc.ConnConfig.RuntimeParams["application_name"] == "" {
		// So a DBA can tell the broker's sessions apart in pg_stat_activity.
		pc.ConnConfig.RuntimeParams["application_name"] = "credbroker"
	}
	switch {
	case cfg.ConnectTimeout > 0:
		pc.ConnConfig.ConnectTimeout = cfg.ConnectTimeout
	case pc.ConnConfig.ConnectTimeout == 0: // no connect_timeout in the URL either
		pc.ConnConfig.ConnectTimeout = DefaultConnectTimeout
	}
	if pc.ConnConfig.Database == "" {
		// What the server assumes too: issued users need the name.
		pc.ConnConfig.Database = pc.ConnConfig.User
	}
	pc.MaxConns = cfg.MaxConns
	e := &engine{
		marker:           cfg.MarkerRole,
		endpoint:         endpointOf(pc),
		terminateTimeout: cfg.TerminateTimeout,
		scramIterations:  cfg.ScramIterations,
		log:              cfg.Logger,
		secrets:          []string{cfg.Password, cfg.URL},
	}
	e.password.Store(&cfg.Password)
	// Read at every new connection, so a rotated password takes effect
	// without replacing the pool (open connections stay valid).
	pc.BeforeConnect = func(_ context.Context, cc *pgx.ConnConfig) error {
		cc.Password = *e.password.Load()
		return nil
	}
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	e.pool = pool
	if err := e.init(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return e, nil
}

// endpointOf is where the users of the target pc connects to log in.
func endpointOf(pc *pgxpool.Config) broker.Endpoint {
	db := pc.ConnConfig.Database
	if db == "" {
		db = pc.ConnConfig.User // what the server assumes too
	}
	return broker.Endpoint{Host: pc.ConnConfig.Host, Port: int(pc.ConnConfig.Port), Database: db}
}

// TargetEndpoint is the Endpoint an Engine for the admin URL would report,
// without connecting: for a target that cannot be reached yet. Its errors
// never quote the URL.
func TargetEndpoint(adminURL string) (broker.Endpoint, error) {
	pc, err := parseAdminURL(adminURL)
	if err != nil {
		return broker.Endpoint{}, err
	}
	return endpointOf(pc), nil
}

// parseAdminURL accepts only postgres:// URLs without a password. Its
// errors never quote the URL: a mistyped URL may still hold a password.
func parseAdminURL(raw string) (*pgxpool.Config, error) {
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // url.Error's own text repeats the whole URL
		}
		return nil, fmt.Errorf("postgres: target url is malformed (not shown): %v", err)
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return nil, errors.New("postgres: target url must start with postgres:// (not shown, it may hold a password)")
	}
	_, inline := u.User.Password()
	if inline || u.Query().Has("password") {
		return nil, errors.New("postgres: target url must not contain a password; " +
			"put the password in the target's password_file (or its environment variable) instead")
	}
	pc, err := pgxpool.ParseConfig(raw)
	if err != nil {
		// pgconn's ParseConfigError repeats the connection string; keep
		// only its cause.
		if inner := errors.Unwrap(err); inner != nil {
			return nil, fmt.Errorf("postgres: target url cannot be parsed (not shown): %v", inner)
		}
		return nil, errors.New("postgres: target url cannot be parsed (not shown)")
	}
	return pc, nil
}

// init checks the server and the admin role and ensures the marker role.
func (e *engine) init(ctx context.Context) error {
	var super, createRole bool
	err := e.pool.QueryRow(ctx, adminQuery).Scan(&e.version, &e.admin, &super, &createRole)
	if err != nil {
		return fmt.Errorf("postgres: connecting as admin: %w", err)
	}
	if e.version < minServerVersion {
		return fmt.Errorf("postgres: server version %d is not supported (PostgreSQL 13 or newer)", e.version/10000)
	}
	switch {
	case super:
		e.log.Warn("the admin role is a superuser; credbroker needs only the grants of AdminSetupSQL",
			"admin", e.admin)
	case !createRole:
		return fmt.Errorf("postgres: admin role %q lacks CREATEROLE (ALTER ROLE %s CREATEROLE)",
			e.admin, quoteIdent(e.admin))
	}
	return e.ensureMarker(ctx)
}

func (e *engine) ensureMarker(ctx context.Context) error {
	r, err := e.roleInfo(ctx, e.marker)
	if errors.Is(err, pgx.ErrNoRows) {
		_, cerr := e.pool.Exec(ctx, createMarkerSQL(e.marker))
		switch sqlState(cerr) {
		case "":
			if cerr != nil {
				return fmt.Errorf("postgres: creating marker role %q: %w", e.marker, cerr)
			}
			e.log.Info("created the marker role", "marker_role", e.marker)
			if e.version < 160000 {
				// 16+ gives the creator ADMIN OPTION by itself; before 16
				// CREATEROLE may take it, so pg_upgrade to 16 keeps working.
				_, _ = e.pool.Exec(ctx, grantWithAdminSQL(e.marker, e.admin))
			}
			return nil
		case codeDuplicateObject: // created concurrently by another broker
			r, err = e.roleInfo(ctx, e.marker)
		default:
			return fmt.Errorf("postgres: marker role %q does not exist and admin role %q cannot create it (%v): "+
				"run CREATE ROLE %s NOLOGIN; GRANT %[4]s TO %s WITH ADMIN OPTION",
				e.marker, e.admin, cerr, quoteIdent(e.marker), quoteIdent(e.admin))
		}
	}
	if err != nil {
		return fmt.Errorf("postgres: reading marker role %q: %w", e.marker, err)
	}
	if r.canLogin || r.super {
		return fmt.Errorf("postgres: marker role %q must be NOLOGIN and not a superuser "+
			"(every issued user is a member of it): ALTER ROLE %s NOLOGIN NOSUPERUSER",
			e.marker, quoteIdent(e.marker))
	}
	return e.checkGrantable(r, "marker role")
}

// role is what the engine checks about a proxy or marker role.
type role struct {
	name      string
	canLogin  bool
	super     bool
	usage     bool // the admin has its privileges
	grantable bool // the admin holds ADMIN OPTION on it
}

func (e *engine) roleInfo(ctx context.Context, name string) (role, error) {
	r := role{name: name}
	err := e.pool.QueryRow(ctx, roleQuery, name).Scan(&r.canLogin, &r.super, &r.usage, &r.grantable)
	return r, err
}

// checkGrantable reports a missing grant of a proxy or marker role to the
// admin, naming the GRANT that fixes it.
func (e *engine) checkGrantable(r role, what string) error {
	fix := grantWithAdminSQL(r.name, e.admin)
	if what != "marker role" && !r.usage {
		// REASSIGN OWNED ... TO proxy requires the privileges of both roles.
		return fmt.Errorf("postgres: admin role %q lacks the privileges of %s %q, which dropping a user "+
			"needs (REASSIGN OWNED): %s", e.admin, what, r.name, fix)
	}
	if !r.grantable {
		if e.version >= 160000 {
			return fmt.Errorf("postgres: admin role %q cannot grant %s %q to new users "+
				"(PostgreSQL 16+ requires ADMIN OPTION): %s", e.admin, what, r.name, fix)
		}
		// 13-15: CREATEROLE may grant any non-superuser role.
		e.log.Warn("the admin role lacks ADMIN OPTION on a role it grants; fine before PostgreSQL 16, required after an upgrade",
			"admin", e.admin, "role", r.name, "fix", fix)
	}
	return nil
}

func (e *engine) checkOpen() error {
	if e.closed.Load() {
		return fmt.Errorf("postgres: engine %w", broker.ErrClosed)
	}
	return nil
}

func invalid(what string, err error) error {
	return fmt.Errorf("%w: %s: %v", broker.ErrInvalidArgument, what, err)
}

// validRenewal checks what RenewUser and RenewUsers are asked, before
// anything is sent.
func validRenewal(req broker.RenewUserRequest) error {
	if err := validUsername(req.Username); err != nil {
		return invalid("username", err)
	}
	if req.ValidUntil.IsZero() {
		return invalid("valid until", errors.New("missing"))
	}
	return nil
}

// validDeletion checks what DeleteUser and DeleteUsers are asked, before
// anything is sent. The proxy role may be empty (see DeleteUser).
func validDeletion(req broker.DeleteUserRequest) error {
	if err := validUsername(req.Username); err != nil {
		return invalid("username", err)
	}
	if req.ProxyRole != "" {
		if err := ValidIdentifier(req.ProxyRole); err != nil {
			return invalid("proxy role", err)
		}
	}
	return nil
}

// validBatch is the start of RenewUsers and DeleteUsers: errs[i] is the
// result of reqs[i] for each request valid rejects (for every request, if
// the engine is closed), and todo lists the indexes of the others.
func validBatch[R any](e *engine, reqs []R, valid func(R) error) (errs []error, todo []int) {
	errs = make([]error, len(reqs))
	if err := e.checkOpen(); err != nil {
		for i := range errs {
			errs[i] = err
		}
		return errs, nil
	}
	for i, r := range reqs {
		if err := valid(r); err != nil {
			errs[i] = err
		} else {
			todo = append(todo, i)
		}
	}
	return errs, todo
}

// newUser creates the user in one transaction (one round trip): LOGIN with a SCRAM verifier
// and VALID UNTIL req.ValidUntil (written as given: the caller adds any
// grace), member of the proxy and the marker role, and SET role = proxy,
// so whatever it creates belongs to the proxy role. A user that already
// exists yields an error wrapping broker.ErrExists.
//
// The user is not granted to the admin here but when it is dropped
// (DeleteUser's first step), which is when the admin needs its privileges
// (to end its sessions before 16, and to REASSIGN/DROP OWNED BY it).
// Granted at creation, every live user would be a role the admin belongs
// to, and PostgreSQL's cost of each CREATE ROLE grows with the roles its
// creator belongs to: measured on 15, 2,000 users took 31 s with the
// grant and the next 2,000 took 106 s, against 10-21 s per 2,000 without
// it, flat.
//
// A verifier it computes is left in req.Verifier, so that Engine redacts
// it too.
func (e *engine) newUser(ctx context.Context, req *broker.NewUserRequest) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	if err := validUsername(req.Username); err != nil {
		return invalid("username", err)
	}
	if err := ValidIdentifier(req.ProxyRole); err != nil {
		return invalid("proxy role", err)
	}
	if req.ValidUntil.IsZero() {
		return invalid("valid until", errors.New("missing: a user without VALID UNTIL never expires"))
	}
	var err error
	if req.Verifier == "" {
		if req.Verifier, err = e.hashPassword(req.Password); err != nil {
			return err
		}
	}
	// One simple-protocol query (Exec without arguments) of several
	// statements runs as one implicit transaction, in one round trip
	// instead of four (BEGIN, two statements, COMMIT): on a busy target
	// the round trips, not the catalog writes, were the broker's overhead.
	_, err = e.pool.Exec(ctx, CreateUserSQL(req.Username, req.ProxyRole, e.marker, req.Verifier, req.ValidUntil))
	if err != nil {
		err = fmt.Errorf("creating user: %w", err)
	}
	switch {
	case err == nil:
		e.managed.add(req.Username)
		e.log.Debug("created user", "user", req.Username, "proxy_role", req.ProxyRole, "valid_until", req.ValidUntil)
		return nil
	case sqlState(err) == codeDuplicateObject:
		err = fmt.Errorf("%w: %w", broker.ErrExists, err)
	case sqlState(err) == codeInsufficientPriv:
		err = fmt.Errorf("%w (does admin role %q have the grants of AdminSetupSQL for proxy role %q?)",
			err, e.admin, req.ProxyRole)
	}
	return fmt.Errorf("postgres: user %q: %w", req.Username, err)
}

// hashPassword is the SCRAM-SHA-256 verifier NewUser stores for password,
// at the target's iteration count.
func (e *engine) hashPassword(password string) (string, error) {
	v, err := ScramSHA256VerifierIter(password, e.scramIterations)
	if err != nil {
		return "", invalid("password", err)
	}
	return v, nil
}

// renewUser moves the user's VALID UNTIL. A missing user is ErrUserNotFound.
func (e *engine) renewUser(ctx context.Context, req broker.RenewUserRequest) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	if err := validRenewal(req); err != nil {
		return err
	}
	if err := e.requireManaged(ctx, req.Username); err != nil {
		return err
	}
	_, err := e.pool.Exec(ctx, RenewUserSQL(req.Username, req.ValidUntil))
	if sqlState(err) == codeUndefinedObject {
		err = ErrUserNotFound
	}
	if err != nil {
		return fmt.Errorf("postgres: renewing user %q: %w", req.Username, err)
	}
	return nil
}

// requireManaged returns ErrUserNotFound for a missing role, and refuses
// a role the broker did not make: one that is not a plain member of the
// marker role, or that holds ADMIN OPTION on it (the admin itself), or is
// privileged. A corrupted lease must never alter or drop someone else.
func (e *engine) requireManaged(ctx context.Context, username string) error {
	managed, err := e.managedStatus(ctx, []string{username})
	if err != nil {
		return fmt.Errorf("postgres: looking up user %q: %w", username, err)
	}
	ok, exists := managed[username]
	switch {
	case !exists:
		return ErrUserNotFound
	case !ok:
		return e.notManaged(username)
	}
	return nil
}

// managedStatus says, for each of names that exists, whether it is the
// broker's (see managedRole). A name missing from the map does not exist.
func (e *engine) managedStatus(ctx context.Context, names []string) (map[string]bool, error) {
	rows, err := e.pool.Query(ctx, managedQuery, names, e.marker)
	if err != nil {
		return nil, err
	}
	managed := make(map[string]bool, len(names))
	var name string
	var ok bool
	_, err = pgx.ForEachRow(rows, []any{&name, &ok}, func() error {
		managed[name] = ok
		return nil
	})
	if err != nil {
		return nil, err
	}
	return managed, nil
}

// notManaged is the refusal to touch a role the broker did not make.
func (e *engine) notManaged(username string) error {
	return fmt.Errorf("postgres: refusing to touch role %q: it is not a plain member of the marker role %q, "+
		"so credbroker did not create it", username, e.marker)
}

// deleteUser drops the user in an order that leaves no way back in and no
// object behind; every step is idempotent, so a failed attempt is simply
// retried:
//
//  1. ALTER ROLE NOLOGIN, committed at once: no new session can start
//     (VALID UNTIL alone never ends an open session); in the same
//     transaction the user is granted to the admin, whose privileges the
//     next steps need (see NewUser);
//  2. terminate every session of the user and wait until none is left;
//     the query that finds none left also reads pg_shdepend, the catalog
//     DROP ROLE itself consults, for the databases where the user owns
//     objects or holds privileges (see endSessionsQuery);
//  3. REASSIGN OWNED BY user TO proxy; DROP OWNED BY user, in each of
//     those databases, and only there: a user that owns nothing and was
//     granted nothing (the usual case: its objects belong to the proxy
//     role, see NewUser) skips both;
//  4. DROP ROLE IF EXISTS, in one transaction with step 3 for the
//     admin's own database.
//
// If DROP ROLE still finds something depending on the user (a privilege
// granted to it after step 2 read the catalog, or a session that was
// authenticating while logins were blocked), steps 2 to 4 run again with
// REASSIGN/DROP OWNED in the admin's database whatever the catalog said.
//
// A user that does not exist is success. An empty req.ProxyRole (a user no
// lease names, found by reconciliation) means the proxy role recorded in
// the user's own SET role setting; failing that, or when the proxy role no
// longer exists, what the user owns is dropped instead of reassigned.
func (e *engine) deleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	if err := validDeletion(req); err != nil {
		return err
	}
	e.managed.forget(req.Username)
	err := e.dropUser(ctx, req)
	if errors.Is(err, ErrUserNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("postgres: dropping user %q: %w", req.Username, err)
	}
	e.log.Debug("dropped user", "user", req.Username)
	return nil
}

// dropUser is deleteUser's sequence.
func (e *engine) dropUser(ctx context.Context, req broker.DeleteUserRequest) error {
	users := []string{req.Username}

	// 1.
	if err := e.requireManaged(ctx, req.Username); err != nil {
		return err
	}
	if _, err := e.pool.Exec(ctx, BlockLoginsSQL(req.Username, e.admin)); err != nil {
		if sqlState(err) == codeUndefinedObject {
			return ErrUserNotFound
		}
		return fmt.Errorf("blocking logins: %w", err)
	}

	// 2., then 3. and 4. where the catalog says.
	owned, err := e.endSessions(ctx, users, nil)
	if err != nil {
		return err
	}
	here := owned.here[req.Username]
	err = e.disownAndDrop(ctx, req, here, owned.elsewhere[req.Username])
	if here || sqlState(err) != codeDependentObjects {
		return err
	}
	e.log.Info("DROP ROLE found objects the catalog did not list a moment before; dropping them first",
		"user", req.Username, "err", e.sanitize(ctx, err))
	if owned, err = e.endSessions(ctx, users, nil); err != nil {
		return err
	}
	return e.disownAndDrop(ctx, req, true, owned.elsewhere[req.Username])
}

// disownAndDrop is steps 3 and 4 of deleteUser: REASSIGN/DROP OWNED in
// each database of elsewhere, and here too if here is set, then DROP ROLE.
func (e *engine) disownAndDrop(ctx context.Context, req broker.DeleteUserRequest, here bool, elsewhere []otherDatabase) error {
	users := []string{req.Username}
	drop := DropUsersSQL(users...)
	if here || len(elsewhere) > 0 {
		proxy, err := e.reassignTarget(ctx, req)
		if err != nil {
			return err
		}
		if proxy == "" {
			e.log.Warn("no proxy role to reassign to; objects the user owns are dropped",
				"user", req.Username, "proxy_role", req.ProxyRole)
		}
		disown := DisownSQL(users, proxy)
		for _, d := range elsewhere {
			if !d.allowConn {
				return fmt.Errorf("the user has objects in database %q, which allows no connections", d.name)
			}
			if err := e.execIn(ctx, d.name, disown); err != nil {
				if sqlState(err) == codeUndefinedObject {
					return ErrUserNotFound
				}
				return fmt.Errorf("in database %q: %w", d.name, err)
			}
		}
		if here {
			// Several statements in one simple-protocol query run as one
			// transaction: the role goes only together with what it owned
			// here.
			drop = disown + "; " + drop
		}
	}
	if _, err := e.pool.Exec(ctx, drop); err != nil {
		if sqlState(err) == codeUndefinedObject {
			return ErrUserNotFound
		}
		return err
	}
	return nil
}

// reassignTarget is the role that inherits what the user owns: the
// request's proxy role, else the one the user's SET role setting names
// (NewUser records it there); "" if there is none the admin can use.
func (e *engine) reassignTarget(ctx context.Context, req broker.DeleteUserRequest) (string, error) {
	proxy := req.ProxyRole
	if proxy == "" {
		var setting *string
		err := e.pool.QueryRow(ctx, roleSettingQuery, req.Username).Scan(&setting)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return "", fmt.Errorf("reading the user's role setting: %w", err)
		}
		if setting == nil || ValidIdentifier(*setting) != nil {
			return "", nil
		}
		proxy = *setting
	}
	// REASSIGN OWNED needs the privileges of the target role. Without them
	// (the role is gone, or its grant to the admin was revoked) dropping
	// the objects beats a user that can never be revoked.
	var usable bool
	if err := e.pool.QueryRow(ctx, usableQuery, proxy).Scan(&usable); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("looking up proxy role: %w", err)
	}
	if !usable {
		return "", nil
	}
	return proxy, nil
}

// otherDatabase is another database of the cluster where a user owns
// objects or holds privileges.
type otherDatabase struct {
	name      string
	allowConn bool
}

// ownership is what pg_shdepend said about the users endSessions ended,
// once none of their sessions was left.
type ownership struct {
	// here: users that own objects or hold privileges in the admin's
	// database or on shared objects (REASSIGN/DROP OWNED must run here).
	here map[string]bool
	// elsewhere: the other databases where each user does.
	elsewhere map[string][]otherDatabase
	// usableProxies counts the proxy roles endSessions was given that the
	// admin has the privileges of.
	usableProxies int
}

// endSessions terminates the users' sessions, in every database, until
// none is left, and returns what the users own as the catalog shows it
// then (endSessionsQuery: the same round trip). pg_terminate_backend only
// signals; the loop re-checks with a short backoff, which also catches a
// session that was authenticating when logins were blocked.
func (e *engine) endSessions(ctx context.Context, usernames, proxies []string) (ownership, error) {
	tctx, cancel := context.WithTimeout(ctx, e.terminateTimeout)
	defer cancel()
	timedOut := func(n int) error {
		if ctx.Err() != nil {
			return ctx.Err() // the caller gave up, not us
		}
		return fmt.Errorf("ending sessions: %d still open after %v", n, e.terminateTimeout)
	}
	if proxies == nil {
		proxies = []string{}
	}
	delay := 2 * time.Millisecond
	for n := -1; ; {
		var here, otherUsers, otherDBs []string
		var otherAllow []bool
		var owned ownership
		err := e.pool.QueryRow(tctx, endSessionsQuery, usernames, proxies).
			Scan(&n, &here, &otherUsers, &otherDBs, &otherAllow, &owned.usableProxies)
		if err != nil {
			if tctx.Err() != nil {
				return ownership{}, timedOut(n)
			}
			return ownership{}, fmt.Errorf("ending sessions: %w", err)
		}
		if n == 0 {
			owned.here = make(map[string]bool, len(here))
			for _, u := range here {
				owned.here[u] = true
			}
			owned.elsewhere = map[string][]otherDatabase{}
			for i, u := range otherUsers {
				owned.elsewhere[u] = append(owned.elsewhere[u], otherDatabase{name: otherDBs[i], allowConn: otherAllow[i]})
			}
			if e.ownershipHook != nil {
				e.ownershipHook(&owned)
			}
			return owned, nil
		}
		t := time.NewTimer(delay)
		select {
		case <-tctx.Done():
			t.Stop()
			return ownership{}, timedOut(n)
		case <-t.C:
		}
		delay = min(delay*2, 100*time.Millisecond)
	}
}

// execIn runs sql in another database of the cluster over a short-lived
// connection: a pool's connections are bound to one database.
func (e *engine) execIn(ctx context.Context, database, sql string) error {
	cc := e.pool.Config().ConnConfig.Copy()
	cc.Database = database
	cc.Password = *e.password.Load()
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()
	_, err = conn.Exec(ctx, sql)
	return err
}

// listManagedUsers lists the members of the marker role, except roles that
// administer it (the admin holds ADMIN OPTION on the marker role, so it is a
// member too) and privileged roles: the reconciler drops what this returns.
// now is the server's clock (statement_timestamp: this statement's start).
func (e *engine) now(ctx context.Context) (time.Time, error) {
	if err := e.checkOpen(); err != nil {
		return time.Time{}, err
	}
	var t time.Time
	if err := e.pool.QueryRow(ctx, "SELECT statement_timestamp()").Scan(&t); err != nil {
		return time.Time{}, fmt.Errorf("postgres: reading the server's clock: %w", err)
	}
	return t, nil
}

func (e *engine) listManagedUsers(ctx context.Context) ([]string, error) {
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	rows, err := e.pool.Query(ctx, listManagedQuery, e.marker)
	if err != nil {
		return nil, fmt.Errorf("postgres: listing managed users: %w", err)
	}
	users, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("postgres: listing managed users: %w", err)
	}
	return users, nil
}

// sampleSessions reads the open sessions of the broker's users.
func (e *engine) sampleSessions(ctx context.Context) ([]broker.Session, error) {
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	rows, err := e.pool.Query(ctx, sessionsQuery, e.marker)
	if err != nil {
		return nil, fmt.Errorf("postgres: reading pg_stat_activity: %w", err)
	}
	var out []broker.Session
	var start, query pgtype.Timestamptz
	var s broker.Session
	_, err = pgx.ForEachRow(rows, []any{&s.Username, &s.PID, &start, &s.ApplicationName, &s.ClientAddr, &query}, func() error {
		s.BackendStart, s.QueryStart = time.Time{}, time.Time{}
		if start.Valid {
			s.BackendStart = start.Time
		}
		if query.Valid {
			s.QueryStart = query.Time
		}
		out = append(out, s)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("postgres: reading pg_stat_activity: %w", err)
	}
	return out, nil
}

// checkProxyRole reports an error if the proxy role does not exist, can
// log in, is a superuser (an issued user could SET ROLE to it), is the
// marker role, or the admin lacks the grants to hand it out and to take
// over its users' objects. The error names the fix.
func (e *engine) checkProxyRole(ctx context.Context, proxyRole string) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	if err := ValidIdentifier(proxyRole); err != nil {
		return invalid("proxy role", err)
	}
	if proxyRole == e.marker {
		return fmt.Errorf("postgres: proxy role %q is the marker role", proxyRole)
	}
	r, err := e.roleInfo(ctx, proxyRole)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("postgres: proxy role %q does not exist (CREATE ROLE %s NOLOGIN, then grant it privileges)",
			proxyRole, quoteIdent(proxyRole))
	case err != nil:
		return fmt.Errorf("postgres: checking proxy role %q: %w", proxyRole, err)
	case r.canLogin:
		return fmt.Errorf("postgres: proxy role %q can log in; proxy roles must be NOLOGIN (ALTER ROLE %s NOLOGIN)",
			proxyRole, quoteIdent(proxyRole))
	case r.super:
		return fmt.Errorf("postgres: proxy role %q is a superuser; issued users could SET ROLE to it", proxyRole)
	}
	return e.checkGrantable(r, "proxy role")
}

var _ database = (*engine)(nil)

func (e *engine) describe() description {
	return description{endpoint: e.endpoint, version: e.version, admin: e.admin, marker: e.marker}
}

func (e *engine) redacted() []string { return slices.Concat(e.secrets, e.pastPasswords()) }

// sanitize is Engine's sanitizing for what the engine logs, and for the
// callers in check.go and rotate.go, which also name secrets only they
// know (a verifier). Engine sanitizes every error it returns regardless.
func (e *engine) sanitize(ctx context.Context, err error, secrets ...string) error {
	if err == nil {
		return nil
	}
	return sanitize(ctx, err, slices.Concat(secrets, e.redacted())...)
}

// close releases the connection pool. Later calls fail with broker.ErrClosed.
func (e *engine) close() {
	if e.closed.CompareAndSwap(false, true) {
		e.pool.Close()
	}
}
