// Package fuzz_test holds the fuzz test of the configuration file, which
// operators control. It lives apart from server/config because that
// package is being rewritten; it moves next to the code it fuzzes, as the
// request validation fuzz already did (server/request_fuzz_test.go: with
// pgtest starting PostgreSQL lazily, fuzz workers no longer start one).
// Nothing here needs a database.
//
// The seed corpus is in testdata/fuzz (example configurations); `go test`
// runs the seeds, and
//
//	go test -run '^$' -fuzz FuzzConfig -fuzztime 5m ./internal/fuzz
//
// searches beyond them.
package fuzz_test
