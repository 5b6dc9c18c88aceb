package audit

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// BreakError is the first broken link Verify found.
type BreakError struct {
	// Line is the 1-based line number of the first record that does not
	// chain to the line before it (or cannot be read).
	Line   int
	Reason string
}

func (e *BreakError) Error() string {
	return fmt.Sprintf("line %d: %s", e.Line, e.Reason)
}

// VerifyResult summarises a file whose chain is intact.
type VerifyResult struct {
	Records int
	// FirstSeq and LastSeq are the seq of the first and last record.
	FirstSeq, LastSeq uint64
	// Head is the digest of the last line: what the next record's prev
	// will be. The chain cannot vouch for the last line itself, so an
	// operator who keeps Head elsewhere (a ticket, another host) can
	// later check that the file still ends where it did.
	Head string
}

// Verify reads an audit log and checks every link: each record's prev
// must be the digest of the line before it (64 zeros for the first line)
// and its seq one more than that line's. With hmacKey set, every record
// must be HMAC-chained under it: a record that claims plain SHA-256 in a
// keyed log is how a forger would start a chain of their own.
//
// It returns a *BreakError for the first broken link; other errors are
// read errors.
func Verify(r io.Reader, hmacKey []byte) (VerifyResult, error) {
	var res VerifyResult
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	plain, keyed := chainer{}, chainer{key: hmacKey}
	var (
		prevLine []byte
		prevSeq  uint64
		lineNo   int
	)
	for sc.Scan() {
		lineNo++
		line := sc.Bytes()
		var rec Record
		if err := json.Unmarshal(line, &rec); err != nil {
			return res, &BreakError{Line: lineNo, Reason: "not a JSON audit record"}
		}
		if rec.Prev == "" {
			return res, &BreakError{Line: lineNo, Reason: "record has no prev field"}
		}
		var c chainer
		switch rec.MAC {
		case "":
			if hmacKey != nil {
				return res, &BreakError{Line: lineNo, Reason: "record is chained with plain SHA-256, but the log is keyed (HMAC)"}
			}
			c = plain
		case MACHMAC:
			if hmacKey == nil {
				return res, &BreakError{Line: lineNo, Reason: "record is chained with HMAC-SHA-256; pass the key (--hmac-key-file) to verify it"}
			}
			c = keyed
		default:
			return res, &BreakError{Line: lineNo, Reason: fmt.Sprintf("unknown mac %q", rec.MAC)}
		}
		want := Genesis
		if prevLine != nil {
			want = c.link(prevLine)
		}
		if rec.Prev != want {
			reason := "prev does not match the digest of the line before it (that line was edited, or a line was deleted, inserted or moved here)"
			if prevLine == nil {
				reason = "the first record does not start a chain (records before it were deleted)"
			}
			return res, &BreakError{Line: lineNo, Reason: reason}
		}
		if prevLine != nil && rec.Seq != prevSeq+1 {
			return res, &BreakError{Line: lineNo, Reason: fmt.Sprintf("seq %d follows seq %d", rec.Seq, prevSeq)}
		}
		if res.Records == 0 {
			res.FirstSeq = rec.Seq
		}
		res.Records++
		res.LastSeq = rec.Seq
		res.Head = c.link(line)
		prevSeq = rec.Seq
		prevLine = append(prevLine[:0], line...)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return res, &BreakError{Line: lineNo + 1, Reason: fmt.Sprintf("line longer than %d bytes", maxLine)}
		}
		return res, err
	}
	return res, nil
}
