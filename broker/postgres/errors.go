package postgres

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/credbroker/credbroker/broker"
)

// ErrUserNotFound is returned by RenewUser when the user does not exist
// (someone dropped it outside the broker). It is broker.ErrUserNotFound,
// so the broker can end the lease.
var ErrUserNotFound = broker.ErrUserNotFound

// SQLSTATE codes the engine acts on.
const (
	codeUndefinedObject   = "42704" // role does not exist
	codeDuplicateObject   = "42710" // role already exists
	codeInsufficientPriv  = "42501"
	codeDependentObjects  = "2BP01" // DROP ROLE: some objects depend on it
	codeTooManyConns      = "53300"
	codeAdminShutdown     = "57P01"
	codeCrashShutdown     = "57P02"
	codeCannotConnectNow  = "57P03"
	classConnectionFailed = "08"
)

func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// classify marks errors that mean "the server cannot be reached or cannot
// serve now" with broker.ErrUnavailable, so the broker retries and the API
// answers Unavailable: dial failures, connect and I/O timeouts, a connection
// lost mid-query, and the server's own "shutting down / too many
// connections" refusals. When the caller's ctx is done, its error passes
// through unchanged. Everything else (a statement the server rejected,
// the engine's own errors) is left alone.
func classify(ctx context.Context, err error) error {
	if err == nil || ctx.Err() != nil || errors.Is(err, broker.ErrUnavailable) {
		return err
	}
	if unavailable(err) {
		return fmt.Errorf("%w: %w", broker.ErrUnavailable, err)
	}
	return err
}

func unavailable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// Checked first: a failed login (bad password) is also a
		// ConnectError, but it is a configuration error, not an outage.
		return strings.HasPrefix(pgErr.Code, classConnectionFailed) ||
			pgErr.Code == codeTooManyConns || pgErr.Code == codeAdminShutdown ||
			pgErr.Code == codeCrashShutdown || pgErr.Code == codeCannotConnectNow
	}
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	// pgconn's I/O failures ("failed to receive message", "conn closed")
	// all say whether a retry is safe; nothing else in pgx does.
	var ioErr interface{ SafeToRetry() bool }
	return errors.As(err, &connectErr) || errors.As(err, &netErr) || errors.As(err, &ioErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err)
}

// redactedError replaces the text of an error that contained a secret. It
// still unwraps to the original, so errors.Is/As keep working; only the
// message is guaranteed clean.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// redact is sanitize's last step, so the last step of every exported
// method: whatever a driver or server message echoed, the returned error's
// text holds none of secrets. The engine never builds a message from a
// secret in the first place; this is the belt to those braces (Vault's
// dbplugin middleware does the same).
func redact(err error, secrets ...string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	changed := false
	for _, s := range secrets {
		if s != "" && strings.Contains(msg, s) {
			msg = strings.ReplaceAll(msg, s, "[REDACTED]")
			changed = true
		}
	}
	if !changed {
		return err
	}
	return &redactedError{msg: msg, err: err}
}
