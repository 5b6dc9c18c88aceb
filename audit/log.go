package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// Options configure a Log.
type Options struct {
	// HMACKey, when set, chains records with HMAC-SHA-256 under this key
	// instead of plain SHA-256.
	HMACKey []byte
	// Logger receives write failures (the broker cannot fail a lifecycle
	// event because its record could not be written). Default: discard.
	Logger *slog.Logger
	// Now is the clock for record times. Default: time.Now.
	Now func() time.Time
}

// Log appends chained records to one file. It is safe for concurrent use
// and implements broker.Auditor.
type Log struct {
	mu    sync.Mutex
	f     *os.File
	chain chainer
	prev  string
	seq   uint64
	log   *slog.Logger
	now   func() time.Time
	err   error // the first write error, kept for Err
}

var _ broker.Auditor = (*Log)(nil)

// maxLine bounds one record's line. Every field is capped at maxField
// bytes, so a real record is far below it; a longer line is not ours.
const maxLine = 64 << 10

// Open opens (or creates, mode 0600) the audit file at path and continues
// its chain from the last record. A partial last line, left by a crash
// in the middle of a write, is cut off and noted in a "recovered" record;
// a last line that is whole but not a record is an error, since appending
// to a file that is not an audit log would hide its tampering.
func Open(path string, opts Options) (*Log, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	l := &Log{f: f, chain: chainer{key: opts.HMACKey}, prev: Genesis, log: opts.Logger, now: opts.Now}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if l.now == nil {
		l.now = time.Now
	}
	cut, err := l.resume()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit: %s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		f.Close()
		return nil, fmt.Errorf("audit: %w", err)
	}
	if cut > 0 {
		if err := l.Write(Record{Event: EventRecovered, Outcome: OutcomeOK,
			Message: fmt.Sprintf("cut off %d bytes of a partial record at the end of the file", cut)}); err != nil {
			f.Close()
			return nil, err
		}
	}
	return l, nil
}

// resume reads the file's last line to continue the chain, and truncates
// a partial last line. It returns how many bytes it cut.
func (l *Log) resume() (int64, error) {
	fi, err := l.f.Stat()
	if err != nil {
		return 0, err
	}
	size := fi.Size()
	if size == 0 {
		return 0, nil
	}
	// Read the tail: the last whole line ends at the last newline.
	n := min(size, 2*maxLine)
	tail := make([]byte, n)
	if _, err := l.f.ReadAt(tail, size-n); err != nil {
		return 0, err
	}
	var cut int64
	if tail[len(tail)-1] != '\n' {
		i := bytes.LastIndexByte(tail, '\n')
		cut = int64(len(tail) - (i + 1))
		if err := l.f.Truncate(size - cut); err != nil {
			return 0, err
		}
		tail = tail[:i+1]
		if len(tail) == 0 {
			return cut, nil
		}
	}
	body := tail[:len(tail)-1]
	last := body[bytes.LastIndexByte(body, '\n')+1:]
	var r Record
	if err := json.Unmarshal(last, &r); err != nil || r.Prev == "" {
		return 0, errors.New("the last line is not an audit record; refusing to append to a file that is not a credbroker audit log")
	}
	if r.MAC != l.chain.mac() {
		// Switching between plain and HMAC chaining mid-file is fine for
		// Verify (each record says how it is linked to the next), but say
		// so: it is worth an operator's attention.
		l.log.Warn("audit: chaining method changed", "was", orPlain(r.MAC), "now", orPlain(l.chain.mac()))
	}
	l.prev = l.chain.link(last)
	l.seq = r.Seq
	return cut, nil
}

func orPlain(mac string) string {
	if mac == "" {
		return "sha256"
	}
	return mac
}

// Write appends r, filling Seq, Time (if zero), MAC and Prev. Strings are
// cleaned (valid UTF-8, bounded length).
func (l *Log) Write(r Record) error {
	r.clean()
	if r.Time.IsZero() {
		r.Time = l.now()
	}
	r.Time = r.Time.UTC()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return errors.New("audit: log is closed")
	}
	r.Seq = l.seq + 1
	r.MAC = l.chain.mac()
	r.Prev = l.prev
	line, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	// One write call per line: with the file opened for append by this
	// process alone, a record is never interleaved with another.
	if _, err := l.f.Write(append(line, '\n')); err != nil {
		if l.err == nil {
			l.err = err
		}
		return fmt.Errorf("audit: write: %w", err)
	}
	l.seq = r.Seq
	l.prev = l.chain.link(line)
	return nil
}

// Record writes r and logs (rather than returns) a failure: for callers
// that cannot undo what they are recording.
func (l *Log) Record(r Record) {
	if err := l.Write(r); err != nil {
		l.log.Error("audit record lost", "event", r.Event, "err", err)
	}
}

// AuditLease implements broker.Auditor.
func (l *Log) AuditLease(ev broker.AuditEvent) {
	r := Record{
		Time:     ev.Time,
		Event:    ev.Action,
		Identity: ev.Client,
		Role:     ev.Role,
		LeaseID:  ev.LeaseID,
		Username: ev.Username,
		Target:   ev.Target,
		Outcome:  OutcomeOK,
	}
	if ev.Error != "" {
		r.Outcome, r.Message = OutcomeError, ev.Error
	}
	l.Record(r)
}

// Err returns the first write error, if any: for a health check.
func (l *Log) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// Close syncs and closes the file. Writes after Close fail.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := errors.Join(l.f.Sync(), l.f.Close())
	l.f = nil
	return err
}
