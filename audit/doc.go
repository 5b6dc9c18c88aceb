// Package audit owns credbroker's audit trail: one JSON record per line for
// every gRPC request and every lease lifecycle event, chained so that an
// edited, deleted, inserted or reordered line is detected.
//
// Each record carries, in "prev", the SHA-256 of the previous line's exact
// bytes, or HMAC-SHA-256 under a configured key ("mac": "hmac-sha256"). The
// first record of a file chains to 64 zeros. Plain SHA-256 detects
// accidents and careless edits; anyone who can write the file can also
// recompute a plain chain, which is what the HMAC key (kept away from the
// file's writers) prevents. Neither detects the removal of the newest
// records (truncation): ship the file off the host, or compare the last
// seq with what a monitor has seen, for that.
//
// Records never hold a password or a token: the broker hands the auditor
// names and ids only, and the gRPC layer picks request fields one by one.
//
// Verify checks a file and reports the first broken link; Usage counts
// issued, renewed, revoked, expired and denied per role and identity.
package audit
