package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
)

// ErrAuthFailed is returned by TryPassword when the server refuses the
// password.
var ErrAuthFailed = errors.New("postgres: the server refused the admin password")

// IsAuthFailure reports whether err is the server refusing a login
// (SQLSTATE 28P01 invalid_password, or 28000 invalid_authorization).
func IsAuthFailure(err error) bool {
	switch sqlState(err) {
	case "28P01", "28000":
		return true
	}
	return errors.Is(err, ErrAuthFailed)
}

// SetPassword makes new connections log in with password: the admin's
// password changed at its source (a password file or Vault secret re-read).
// Open connections are unaffected; PostgreSQL checks a password at login
// only.
func (e *engine) SetPassword(password string) {
	old := e.password.Swap(&password)
	if old != nil && *old != "" && *old != password {
		e.secretsMu.Lock()
		if !slices.Contains(e.oldSecret, *old) {
			e.oldSecret = append(e.oldSecret, *old)
		}
		e.secretsMu.Unlock()
	}
}

// pastPasswords are the passwords to redact besides the ones New knew.
func (e *engine) pastPasswords() []string {
	e.secretsMu.Lock()
	defer e.secretsMu.Unlock()
	out := slices.Clone(e.oldSecret)
	if p := e.password.Load(); p != nil {
		out = append(out, *p)
	}
	return out
}

// TryPassword opens one connection as the admin with password and closes
// it: nil if the server accepts it, an error wrapping ErrAuthFailed if it
// refuses it, another error if the server could not be asked.
func (e *engine) TryPassword(ctx context.Context, password string) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	cc := e.pool.Config().ConnConfig.Copy()
	cc.Password = password
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		if IsAuthFailure(err) {
			return ErrAuthFailed
		}
		return e.sanitize(ctx, fmt.Errorf("postgres: trying a password: %w", err), password)
	}
	_ = conn.Close(ctx)
	return nil
}

// RotatePassword sets the admin role's own password to newPassword, sent
// as a SCRAM-SHA-256 verifier (the cleartext never reaches the server or
// its log), and makes new connections use it. A role may always change its
// own password; no grant is needed.
//
// The caller must have recorded newPassword (as a pending secret) before:
// if the statement's outcome is unknown (the connection broke), only
// trying both passwords tells which one the server has.
func (e *engine) RotatePassword(ctx context.Context, newPassword string) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	verifier, err := ScramSHA256Verifier(newPassword)
	if err != nil {
		return invalid("password", err)
	}
	if _, err := e.pool.Exec(ctx, "ALTER ROLE CURRENT_USER PASSWORD "+quoteLiteral(verifier)); err != nil {
		return e.sanitize(ctx, fmt.Errorf("postgres: setting the admin role's password: %w", err), newPassword, verifier)
	}
	e.SetPassword(newPassword)
	e.log.Info("rotated the admin role's password", "admin", e.admin)
	return nil
}
