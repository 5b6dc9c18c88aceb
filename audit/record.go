package audit

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"strings"
	"time"
	"unicode/utf8"
)

// Events of records that are not lease lifecycle events (those use the
// broker.Audit* actions: issue, renew, revoke, expire, revoke_failed,
// reconcile_drop).
const (
	// EventRequest is one gRPC call, with its outcome.
	EventRequest = "request"
	// EventStart is written when the log is opened by brokerd.
	EventStart = "start"
	// EventTLSReload is a certificate reload (or a failed one).
	EventTLSReload = "tls_reload"
	// EventRecovered notes that a partial last line (a crash mid-write)
	// was cut off when the file was opened.
	EventRecovered = "recovered"
	// EventReopened starts the file Reopen opened (after log rotation); its
	// message names where the previous file's chain ended.
	EventReopened = "reopened"
	// EventResumed is the first record written after writes failed; its
	// message says how many records were lost, and since when.
	EventResumed = "resumed"
	// EventLeader is a change of leadership in a broker group on etcd:
	// this instance began (outcome ok) or ended (outcome error) a term.
	EventLeader = "leader"
)

// Outcomes of a record.
const (
	OutcomeOK       = "ok"
	OutcomeDenied   = "denied"  // PermissionDenied or Unauthenticated
	OutcomeQuota    = "quota"   // ResourceExhausted
	OutcomeInvalid  = "invalid" // InvalidArgument
	OutcomeNotFound = "not_found"
	OutcomeError    = "error"
)

// MACHMAC is the value of Record.MAC for records chained with HMAC.
const MACHMAC = "hmac-sha256"

// Genesis is the prev of a file's first record.
var Genesis = strings.Repeat("0", 64)

// Record is one line of the audit log. Field names are the JSON keys; they
// are a format other tools parse, so they are only ever added to.
type Record struct {
	Seq      uint64    `json:"seq"`
	Time     time.Time `json:"time"`
	Event    string    `json:"event"`
	Method   string    `json:"method,omitempty"`
	Identity string    `json:"identity,omitempty"`
	Peer     string    `json:"peer,omitempty"`
	Role     string    `json:"role,omitempty"`
	LeaseID  string    `json:"lease_id,omitempty"`
	Username string    `json:"username,omitempty"`
	Target   string    `json:"target,omitempty"`
	Outcome  string    `json:"outcome"`
	Code     string    `json:"code,omitempty"`
	Message  string    `json:"message,omitempty"`
	MAC      string    `json:"mac,omitempty"`
	Prev     string    `json:"prev"`
}

// maxField bounds every string a record holds: a caller controls some of
// them (a certificate's CN, a role name it asked for) and must not be able
// to make one record megabytes long.
const maxField = 512

// clean makes a caller-supplied string safe and small for the log. JSON
// escaping already keeps control characters and newlines from breaking
// the one-record-per-line format; invalid UTF-8 is replaced here so that
// the bytes hashed are the bytes a JSON reader sees.
func clean(s string) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	if len(s) > maxField {
		cut := maxField
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "..."
	}
	return s
}

func (r *Record) clean() {
	for _, f := range []*string{&r.Event, &r.Method, &r.Identity, &r.Peer, &r.Role, &r.LeaseID, &r.Username, &r.Target, &r.Outcome, &r.Code, &r.Message} {
		*f = clean(*f)
	}
}

// chainer computes the link from one line to the next.
type chainer struct{ key []byte }

func (c chainer) newHash() hash.Hash {
	if c.key != nil {
		return hmac.New(sha256.New, c.key)
	}
	return sha256.New()
}

// link returns the hex digest of line (without its newline).
func (c chainer) link(line []byte) string {
	h := c.newHash()
	h.Write(line)
	return hex.EncodeToString(h.Sum(nil))
}

func (c chainer) mac() string {
	if c.key != nil {
		return MACHMAC
	}
	return ""
}
