package postgres_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/broker/postgres/pgcluster"
)

// TestServerGoesAway stops a cluster under a working Engine: every method
// must then report broker.ErrUnavailable (the broker retries, the API
// answers Unavailable), without the password.
func TestServerGoesAway(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop()

	const password = "AdminPw123"
	stmts := []string{"CREATE ROLE proxy NOLOGIN"}
	setup, err := postgres.AdminSetupSQL(postgres.SetupParams{
		Admin: "broker_admin", AdminPassword: password, ProxyRoles: []string{"proxy"}, ServerVersion: c.Version,
	})
	if err != nil {
		t.Fatal(err)
	}
	stmts = append(stmts, setup...)
	super, err := pgx.Connect(ctx, c.SuperuserURL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stmts {
		if _, err := super.Exec(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	_ = super.Close(ctx)

	e, err := postgres.New(ctx, postgres.Config{URL: c.URL("broker_admin", "", "postgres"), Password: password, ConnectTimeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.NewUser(ctx, broker.NewUserRequest{Username: "u_before", Password: "pw", ProxyRole: "proxy", ValidUntil: hour()}); err != nil {
		t.Fatal(err)
	}

	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	calls := map[string]func() error{
		"NewUser": func() error {
			return e.NewUser(ctx, broker.NewUserRequest{Username: "u_after", Password: "pw", ProxyRole: "proxy", ValidUntil: hour()})
		},
		"RenewUser": func() error {
			return e.RenewUser(ctx, broker.RenewUserRequest{Username: "u_before", ValidUntil: hour()})
		},
		"DeleteUser": func() error {
			return e.DeleteUser(ctx, broker.DeleteUserRequest{Username: "u_before", ProxyRole: "proxy"})
		},
		"ListManagedUsers": func() error { _, err := e.ListManagedUsers(ctx); return err },
		"CheckProxyRole":   func() error { return e.CheckProxyRole(ctx, "proxy") },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			err := call()
			if !errors.Is(err, broker.ErrUnavailable) {
				t.Fatalf("%s with the server down = %v, want ErrUnavailable", name, err)
			}
			if strings.Contains(err.Error(), password) {
				t.Fatalf("the error contains the admin password: %v", err)
			}
		})
	}
}
