package postgres_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
)

func TestRotatePassword(t *testing.T) {
	t.Parallel()
	f := newFixture(t, pgtest.TargetOptions{})
	old := f.tg.AdminPassword
	next := randomName("Rotated")
	if err := f.e.RotatePassword(f.ctx, next); err != nil {
		t.Fatalf("RotatePassword: %v", err)
	}
	if err := f.e.TryPassword(f.ctx, next); err != nil {
		t.Errorf("the new password does not log in: %v", err)
	}
	if err := f.e.TryPassword(f.ctx, old); !errors.Is(err, postgres.ErrAuthFailed) {
		t.Errorf("the old password: %v, want ErrAuthFailed", err)
	}
	// New connections of the engine use the new password.
	f.e.ResetPool()
	if _, err := f.e.ListManagedUsers(f.ctx); err != nil {
		t.Fatalf("a new connection after rotation: %v", err)
	}
	user, password := f.issue(t, "read_only", hour())
	f.mustLogin(t, user, password)

	// SetPassword back to a wrong one: new connections fail, and the error
	// names neither password.
	f.e.SetPassword(old)
	f.e.ResetPool()
	_, err := f.e.ListManagedUsers(f.ctx)
	if err == nil {
		t.Fatal("a connection with the old password succeeded")
	}
	if !postgres.IsAuthFailure(err) {
		t.Errorf("error %v is not an auth failure", err)
	}
	for _, pw := range []string{old, next} {
		if strings.Contains(err.Error(), pw) {
			t.Errorf("error %q holds a password", err)
		}
	}
	if srv := pgtest.Server(t); srv.HasLog() && strings.Contains(string(srv.Log()), next) {
		t.Error("the new cleartext password reached the server log")
	}
}
