// Package fuzz_test holds the fuzz tests of what callers and operators
// control: request validation at the gRPC edge, and the configuration
// file. They live apart from the packages they test because those
// packages' TestMain starts a PostgreSQL cluster, which every fuzz worker
// process would otherwise start too; nothing here needs a database.
//
// The seed corpus is in testdata/fuzz (the injection corpus of the server
// tests and example configurations); `go test` runs the seeds, and
//
//	go test -run '^$' -fuzz FuzzRequestValidation -fuzztime 5m ./internal/fuzz
//	go test -run '^$' -fuzz FuzzConfig -fuzztime 5m ./internal/fuzz
//
// search beyond them.
package fuzz_test
