package postgres

// ScramVerifierWithSalt exposes the deterministic core of
// ScramSHA256Verifier to the tests, for a known-answer check.
var ScramVerifierWithSalt = scramVerifier
