// Package broker owns the domain of credbroker: broker roles, the lease
// lifecycle (issue, renew, revoke, expire), the expiry manager, and the
// reconciler that removes users no lease knows.
//
// It declares the two interfaces it needs, LeaseStore and Database, and
// imports neither gRPC, bbolt nor pgx: store/ and broker/postgres implement
// them, server/ exposes the broker over gRPC.
package broker
