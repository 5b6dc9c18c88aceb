// Package vaultapi serves the subset of HashiCorp Vault's HTTP API that
// Vault clients use for dynamic database credentials (the database
// secrets engine's creds and roles, sys/leases, token self-lookup and
// the probes), so a service written against a Vault SDK switches to
// credbroker by changing its address.
//
// It owns the HTTP side only: paths, methods, Vault's request and
// response shapes, its status codes and error bodies, and lease ids of
// the form <mount>/creds/<role>/<credbroker lease id>. Every request that
// touches a credential or a lease is a call of credbroker's own
// CredentialService or AdminService made through server.Invoker, so it
// passes the same authentication, authorization, quotas, audit and
// logging as a gRPC call; nothing here decides who may do what.
//
// docs/vault-compatibility.md lists every endpoint and where credbroker's
// answers differ from Vault's. server/daemon binds vault_api.listen and
// serves the Handler.
package vaultapi
