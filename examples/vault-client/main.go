// Command vault-client is a service written against HashiCorp Vault's Go
// client, pointed at credbroker's Vault-compatible API by nothing but
// VAULT_ADDR and VAULT_TOKEN: it reads a database credential, logs in
// with it, renews its lease and revokes it.
//
//	VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=dev-any-token go run ./examples/vault-client read_only
//
// (`make dev` serves the API on 127.0.0.1:8200 and accepts any token.)
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5"
)

func main() {
	role := "read_only"
	if len(os.Args) > 1 {
		role = os.Args[1]
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// DefaultConfig reads VAULT_ADDR (and VAULT_CACERT, ...); NewClient
	// reads VAULT_TOKEN: exactly what a service on Vault does.
	client, err := vault.NewClient(vault.DefaultConfig())
	if err == nil {
		err = run(ctx, client, role, os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vault-client:", err)
		os.Exit(1)
	}
}

// run reads database/creds/<role>, logs in, renews and revokes, printing
// each step to out (never the password).
func run(ctx context.Context, client *vault.Client, role string, out io.Writer) error {
	secret, err := client.Logical().ReadWithContext(ctx, "database/creds/"+role)
	if err != nil {
		return err
	}
	if secret == nil {
		return errors.New("no secret at database/creds/" + role)
	}
	username, _ := secret.Data["username"].(string)
	password, _ := secret.Data["password"].(string)
	fmt.Fprintf(out, "lease_id        %s\nlease_duration  %ds (renewable: %t)\nusername        %s\n",
		secret.LeaseID, secret.LeaseDuration, secret.Renewable, username)

	// Vault's database engine returns username and password; credbroker
	// adds host, port, database and a ready DSN.
	dsn, _ := secret.Data["dsn"].(string)
	if dsn == "" {
		dsn = fmt.Sprintf("postgres://%s:%s@%v:%v/%v", username, password, secret.Data["host"], secret.Data["port"], secret.Data["database"])
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("log in as %s: %w", username, err)
	}
	var user, inherited string
	err = conn.QueryRow(ctx, "SELECT session_user, current_user").Scan(&user, &inherited)
	conn.Close(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "logged in       as %s, acting as %s\n", user, inherited)

	renewed, err := client.Sys().RenewWithContext(ctx, secret.LeaseID, 3600)
	if err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	fmt.Fprintf(out, "renewed         lease_duration %ds", renewed.LeaseDuration)
	for _, w := range renewed.Warnings {
		fmt.Fprintf(out, " (%s)", w)
	}
	fmt.Fprintln(out)

	if err := client.Sys().RevokeWithContext(ctx, secret.LeaseID); err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	fmt.Fprintf(out, "revoked         user %s is dropped and its sessions ended\n", username)
	return nil
}
