// Package fuzz_test holds the fuzz test of request validation at the gRPC
// edge (the configuration file's, FuzzConfig, is in server/config). It
// lives apart from package server because that package's TestMain starts a
// PostgreSQL cluster, which every fuzz worker process would otherwise start
// too; nothing here needs a database.
//
// The seed corpus is in testdata/fuzz (the injection corpus of the server
// tests); `go test` runs the seeds, and
//
//	go test -run '^$' -fuzz FuzzRequestValidation -fuzztime 5m ./internal/fuzz
//
// search beyond them.
package fuzz_test
