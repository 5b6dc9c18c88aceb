package postgres

import (
	"context"
	"slices"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/privcheck"
)

var (
	_ broker.Database        = (*Engine)(nil)
	_ broker.UsersDeleter    = (*Engine)(nil)
	_ broker.PasswordHasher  = (*Engine)(nil)
	_ broker.MarkerClaimer   = (*Engine)(nil)
	_ broker.ActivitySampler = (*Engine)(nil)
)

// Engine creates and drops users on one PostgreSQL cluster as a
// non-superuser admin role. It is safe for concurrent use.
//
// Engine is the error-sanitizing layer around the unexported engine that
// does the work (the model is Vault's dbplugin error-sanitizer
// middleware): every exported method hands each error it returns to
// sanitize, which marks an unreachable server with broker.ErrUnavailable
// and removes from the text the admin password (each one it ever had),
// the admin URL and the call's own secrets (a new user's password and
// verifier, a password tried or rotated to). No method returns an inner
// error any other way, so a message that echoes a statement or a
// connection string cannot reach a caller, a log or an API answer.
type Engine struct {
	inner database
}

// database is what Engine wraps: *engine, or a fake in the tests. Its
// errors may hold secrets.
type database interface {
	newUser(ctx context.Context, req *broker.NewUserRequest) error
	hashPassword(password string) (string, error)
	renewUser(ctx context.Context, req broker.RenewUserRequest) error
	renewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error
	deleteUser(ctx context.Context, req broker.DeleteUserRequest) error
	deleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error
	listManagedUsers(ctx context.Context) ([]string, error)
	now(ctx context.Context) (time.Time, error)
	sampleSessions(ctx context.Context) ([]broker.Session, error)
	checkProxyRole(ctx context.Context, proxyRole string) error
	claimMarker(ctx context.Context, group string) error
	CheckPrivileges(ctx context.Context, uses []privcheck.ProxyRoleUse) ([]privcheck.Finding, error)
	SetPassword(password string)
	TryPassword(ctx context.Context, password string) error
	RotatePassword(ctx context.Context, newPassword string) error
	close()
	describe() description
	// redacted is every secret the engine knows: the admin URL and every
	// admin password it has had.
	redacted() []string
}

// description is what an engine learned at start-up.
type description struct {
	endpoint broker.Endpoint
	version  int
	admin    string
	marker   string
}

// New connects to the target, checks the server version and the admin
// role, and makes sure the marker role exists (creating it if the admin
// may). The returned Engine must be closed.
func New(ctx context.Context, cfg Config) (*Engine, error) {
	inner, err := newEngine(ctx, cfg)
	if err != nil {
		return nil, sanitize(ctx, err, cfg.Password, cfg.URL)
	}
	return &Engine{inner: inner}, nil
}

// sanitize is the one way an error leaves the package: classified (a
// connection failure wraps broker.ErrUnavailable, unless ctx is done) and
// redacted of secrets. errors.Is and errors.As still see the original.
func sanitize(ctx context.Context, err error, secrets ...string) error {
	if err == nil {
		return nil
	}
	return redact(classify(ctx, err), secrets...)
}

// sanitize is the package's sanitize with every secret the engine knows
// besides the call's own.
func (e *Engine) sanitize(ctx context.Context, err error, secrets ...string) error {
	if err == nil {
		return nil
	}
	return sanitize(ctx, err, slices.Concat(secrets, e.inner.redacted())...)
}

// sanitizeAll sanitizes a batch's results, looking the secrets up once.
func (e *Engine) sanitizeAll(ctx context.Context, errs []error) []error {
	var secrets []string
	for i, err := range errs {
		if err != nil {
			if secrets == nil {
				secrets = e.inner.redacted()
			}
			errs[i] = sanitize(ctx, err, secrets...)
		}
	}
	return errs
}

// NewUser creates the user in one transaction (one round trip): LOGIN with
// a SCRAM verifier and VALID UNTIL req.ValidUntil (written as given: the
// caller adds any grace), member of the proxy and the marker role, and SET
// role = proxy, so whatever it creates belongs to the proxy role. A user
// that already exists yields an error wrapping broker.ErrExists.
func (e *Engine) NewUser(ctx context.Context, req broker.NewUserRequest) error {
	err := e.inner.newUser(ctx, &req) // fills req.Verifier, to be redacted too
	return e.sanitize(ctx, err, req.Password, req.Verifier)
}

// HashPassword is the SCRAM-SHA-256 verifier NewUser stores for password
// (broker.PasswordHasher): about a millisecond of CPU, which the broker
// spends ahead of the request.
func (e *Engine) HashPassword(password string) (string, error) {
	v, err := e.inner.hashPassword(password)
	return v, e.sanitize(context.Background(), err, password)
}

// RenewUser moves the user's VALID UNTIL. A missing user is ErrUserNotFound.
func (e *Engine) RenewUser(ctx context.Context, req broker.RenewUserRequest) error {
	return e.sanitize(ctx, e.inner.renewUser(ctx, req))
}

// RenewUsers moves the VALID UNTIL of many users in one transaction;
// errs[i] is the result of reqs[i] (see renewals.go).
func (e *Engine) RenewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	return e.sanitizeAll(ctx, e.inner.renewUsers(ctx, reqs))
}

// DeleteUser blocks the user's logins, ends its sessions, hands what it
// owns to the proxy role and drops it (see engine.go). A user that does
// not exist is success.
func (e *Engine) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	return e.sanitize(ctx, e.inner.deleteUser(ctx, req))
}

// DeleteUsers drops many users with DeleteUser's sequence, each step once
// for all of them; errs[i] is the result of reqs[i] (see deleteusers.go).
func (e *Engine) DeleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	return e.sanitizeAll(ctx, e.inner.deleteUsers(ctx, reqs))
}

// ListManagedUsers lists the users the broker made: the plain members of
// the marker role, for the reconciler to drop those no lease knows.
func (e *Engine) ListManagedUsers(ctx context.Context) ([]string, error) {
	users, err := e.inner.listManagedUsers(ctx)
	return users, e.sanitize(ctx, err)
}

// Now is the server's clock (broker.DatabaseClock).
func (e *Engine) Now(ctx context.Context) (time.Time, error) {
	t, err := e.inner.now(ctx)
	return t, e.sanitize(ctx, err)
}

// SampleSessions lists the open sessions of the users the broker made
// (the plain members of the marker role), from pg_stat_activity; see
// broker.Session for what PostgreSQL shows without pg_read_all_stats.
func (e *Engine) SampleSessions(ctx context.Context) ([]broker.Session, error) {
	sessions, err := e.inner.sampleSessions(ctx)
	return sessions, e.sanitize(ctx, err)
}

// CheckProxyRole reports an error if the proxy role does not exist, can
// log in, is a superuser, is the marker role, or the admin lacks the
// grants to hand it out and to take over its users' objects. The error
// names the fix.
func (e *Engine) CheckProxyRole(ctx context.Context, proxyRole string) error {
	return e.sanitize(ctx, e.inner.checkProxyRole(ctx, proxyRole))
}

// ClaimMarker makes sure the broker group owns the marker role, claiming
// it when no one does (see marker.go); another group's role is
// broker.ErrMarkerOwned.
func (e *Engine) ClaimMarker(ctx context.Context, group string) error {
	return e.sanitize(ctx, e.inner.claimMarker(ctx, group))
}

// CheckPrivileges runs the least-privilege check of the proxy roles (see
// check.go).
func (e *Engine) CheckPrivileges(ctx context.Context, uses []privcheck.ProxyRoleUse) ([]privcheck.Finding, error) {
	fs, err := e.inner.CheckPrivileges(ctx, uses)
	return fs, e.sanitize(ctx, err)
}

// SetPassword makes new connections log in with password: the admin's
// password changed at its source. Open connections are unaffected.
func (e *Engine) SetPassword(password string) { e.inner.SetPassword(password) }

// TryPassword opens one connection as the admin with password and closes
// it: nil if the server accepts it, an error wrapping ErrAuthFailed if it
// refuses it, another error if the server could not be asked.
func (e *Engine) TryPassword(ctx context.Context, password string) error {
	return e.sanitize(ctx, e.inner.TryPassword(ctx, password), password)
}

// RotatePassword sets the admin role's own password to newPassword, sent
// as a SCRAM-SHA-256 verifier, and makes new connections use it (see
// rotate.go).
func (e *Engine) RotatePassword(ctx context.Context, newPassword string) error {
	return e.sanitize(ctx, e.inner.RotatePassword(ctx, newPassword), newPassword)
}

// Endpoint is the host, port and database of the admin URL: where issued
// users connect.
func (e *Engine) Endpoint() broker.Endpoint { return e.inner.describe().endpoint }

// Close releases the connection pool. Later calls fail with broker.ErrClosed.
func (e *Engine) Close() { e.inner.close() }

// ServerVersion is the server's version as server_version_num (150018).
func (e *Engine) ServerVersion() int { return e.inner.describe().version }

// AdminRole is the role the engine connects as.
func (e *Engine) AdminRole() string { return e.inner.describe().admin }

// MarkerRole is the role every issued user is a member of.
func (e *Engine) MarkerRole() string { return e.inner.describe().marker }
