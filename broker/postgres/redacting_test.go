package postgres

import (
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/privcheck"
)

// The secrets leakyDatabase knows and puts in every error.
const (
	leakPassword    = "AdminPassw0rd-now"
	leakOldPassword = "AdminPassw0rd-before"
	leakURL         = "postgres://broker_admin@db.internal:5432/app?sslmode=verify-full"
)

// leakyDatabase is an inner engine at its worst: every error it returns
// quotes the admin URL, every admin password and the call's own secret,
// and wraps a lost connection.
type leakyDatabase struct{}

var _ database = leakyDatabase{}

func (leakyDatabase) fail(callSecrets ...string) error {
	return fmt.Errorf("statement failed near %q (url %s, passwords %s %s): %w",
		strings.Join(callSecrets, " "), leakURL, leakPassword, leakOldPassword, io.ErrUnexpectedEOF)
}

func (d leakyDatabase) newUser(_ context.Context, req *broker.NewUserRequest) error {
	req.Verifier = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
	return d.fail(req.Password, req.Verifier)
}

// hashPassword is the real engine's: it quotes no secret of the
// connection, only refuses a bad password.
func (leakyDatabase) hashPassword(password string) (string, error) {
	return (&engine{scramIterations: DefaultScramIterations}).hashPassword(password)
}
func (d leakyDatabase) renewUser(context.Context, broker.RenewUserRequest) error { return d.fail() }
func (d leakyDatabase) renewUsers(_ context.Context, reqs []broker.RenewUserRequest) []error {
	return []error{d.fail(), nil, d.fail()}
}
func (d leakyDatabase) deleteUser(context.Context, broker.DeleteUserRequest) error { return d.fail() }
func (d leakyDatabase) deleteUsers(_ context.Context, reqs []broker.DeleteUserRequest) []error {
	return []error{nil, d.fail()}
}
func (d leakyDatabase) listManagedUsers(context.Context) ([]string, error) { return nil, d.fail() }
func (d leakyDatabase) now(context.Context) (time.Time, error)             { return time.Time{}, d.fail() }
func (d leakyDatabase) sampleSessions(context.Context) ([]broker.Session, error) {
	return nil, d.fail()
}
func (d leakyDatabase) checkProxyRole(context.Context, string) error { return d.fail() }
func (d leakyDatabase) claimMarker(context.Context, string) error    { return d.fail() }
func (d leakyDatabase) CheckPrivileges(context.Context, []privcheck.ProxyRoleUse) ([]privcheck.Finding, error) {
	return nil, d.fail()
}
func (leakyDatabase) SetPassword(string) {}
func (d leakyDatabase) TryPassword(_ context.Context, password string) error {
	return d.fail(password)
}
func (d leakyDatabase) RotatePassword(_ context.Context, newPassword string) error {
	return d.fail(newPassword)
}
func (leakyDatabase) close()                {}
func (leakyDatabase) describe() description { return description{} }
func (leakyDatabase) redacted() []string    { return []string{leakURL, leakPassword, leakOldPassword} }

// TestEngineRedactsEveryError calls every exported method of Engine that
// can fail on an inner engine whose errors hold every secret, and checks
// that no secret reaches the caller, while errors.Is still sees the cause
// and the unavailable mark.
func TestEngineRedactsEveryError(t *testing.T) {
	const (
		userPassword = "UserPassw0rd-fresh"
		newAdmin     = "AdminPassw0rd-next"
		tried        = "AdminPassw0rd-tried"
	)
	e := &Engine{inner: leakyDatabase{}}
	ctx := context.Background()
	one := func(err error) []error { return []error{err} }
	calls := map[string]func() []error{
		"NewUser": func() []error {
			return one(e.NewUser(ctx, broker.NewUserRequest{Username: "u_1", Password: userPassword}))
		},
		"RenewUser":  func() []error { return one(e.RenewUser(ctx, broker.RenewUserRequest{Username: "u_1"})) },
		"RenewUsers": func() []error { return e.RenewUsers(ctx, make([]broker.RenewUserRequest, 3)) },
		"DeleteUser": func() []error { return one(e.DeleteUser(ctx, broker.DeleteUserRequest{Username: "u_1"})) },
		"DeleteUsers": func() []error {
			return e.DeleteUsers(ctx, make([]broker.DeleteUserRequest, 2))
		},
		"ListManagedUsers": func() []error { _, err := e.ListManagedUsers(ctx); return one(err) },
		"Now":              func() []error { _, err := e.Now(ctx); return one(err) },
		"SampleSessions":   func() []error { _, err := e.SampleSessions(ctx); return one(err) },
		"CheckProxyRole":   func() []error { return one(e.CheckProxyRole(ctx, "read_only_role")) },
		"ClaimMarker":      func() []error { return one(e.ClaimMarker(ctx, "g")) },
		"CheckPrivileges":  func() []error { _, err := e.CheckPrivileges(ctx, nil); return one(err) },
		"TryPassword":      func() []error { return one(e.TryPassword(ctx, tried)) },
		"RotatePassword":   func() []error { return one(e.RotatePassword(ctx, newAdmin)) },
	}
	// HashPassword hashes locally (the real engine's hashing, above) and
	// fails on its own.
	notInner := map[string]func() error{
		"HashPassword": func() error { _, err := e.HashPassword(userPassword + "\n"); return err },
	}

	errType := reflect.TypeFor[error]()
	et := reflect.TypeFor[*Engine]()
	for i := range et.NumMethod() {
		m := et.Method(i)
		fails := false
		for o := range m.Type.NumOut() {
			out := m.Type.Out(o)
			fails = fails || out == errType || (out.Kind() == reflect.Slice && out.Elem() == errType)
		}
		if fails && calls[m.Name] == nil && notInner[m.Name] == nil {
			t.Errorf("Engine.%s returns errors but this test does not call it: add it", m.Name)
		}
	}

	secrets := []string{leakURL, leakPassword, leakOldPassword, userPassword, newAdmin, tried,
		"SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			errs := call()
			failed := 0
			for _, err := range errs {
				if err == nil {
					continue
				}
				failed++
				for _, s := range secrets {
					if strings.Contains(err.Error(), s) {
						t.Errorf("the error holds %q: %v", s, err)
					}
				}
				if !errors.Is(err, io.ErrUnexpectedEOF) || !errors.Is(err, broker.ErrUnavailable) {
					t.Errorf("errors.Is lost the cause or the unavailable mark: %v", err)
				}
			}
			if failed == 0 {
				t.Fatal("no error returned")
			}
		})
	}
	for name, call := range notInner {
		t.Run(name, func(t *testing.T) {
			err := call()
			if err == nil {
				t.Fatal("no error returned")
			}
			if strings.Contains(err.Error(), userPassword) {
				t.Errorf("the error holds the password: %v", err)
			}
		})
	}
}

// TestEngineRedactsPasswordsItHad checks what the real engine asks Engine
// to redact: the admin URL and every admin password it has had.
func TestEngineRedactsPasswordsItHad(t *testing.T) {
	e := &engine{secrets: []string{"first-password", leakURL}}
	first := "first-password"
	e.password.Store(&first)
	e.SetPassword("second-password")
	e.SetPassword("third-password")
	got := e.redacted()
	for _, want := range []string{"first-password", "second-password", "third-password", leakURL} {
		if !slices.Contains(got, want) {
			t.Errorf("redacted() = %q, missing %q", got, want)
		}
	}
}
