package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
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
	// RetryInterval is how often a failed log tries to write again on its
	// own, so that it turns healthy without waiting for a record (a
	// server that refuses calls while its log fails writes none).
	// Default: DefaultRetryInterval.
	RetryInterval time.Duration
}

// DefaultRetryInterval is Options.RetryInterval's default.
const DefaultRetryInterval = 5 * time.Second

// Log appends chained records to one file. It is safe for concurrent use
// and implements broker.Auditor.
type Log struct {
	path  string
	retry time.Duration

	mu    sync.Mutex
	f     *os.File
	chain chainer
	prev  string
	seq   uint64
	log   *slog.Logger
	now   func() time.Time
	// err is the last write's error, nil once a write succeeds again;
	// lost counts the records not written since failedAt.
	err      error
	lost     int
	failedAt time.Time
	watchers []func(error)
	closed   chan struct{}
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
	l := &Log{path: path, retry: opts.RetryInterval, chain: chainer{key: opts.HMACKey}, prev: Genesis,
		log: opts.Logger, now: opts.Now, closed: make(chan struct{})}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if l.now == nil {
		l.now = time.Now
	}
	if l.retry <= 0 {
		l.retry = DefaultRetryInterval
	}
	f, tail, cut, err := l.openFile()
	if err != nil {
		return nil, err
	}
	l.f = f
	if tail.found {
		l.prev, l.seq = tail.prev, tail.seq
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

// chainTail is where a file's chain ends.
type chainTail struct {
	found bool // the file holds records
	prev  string
	seq   uint64
}

// openFile opens (or creates) the file at l.path for appending and reads
// where its chain ends. O_APPEND: every write lands at the end of the file
// as it is then, even if something else (copytruncate) moved it.
func (l *Log) openFile() (*os.File, chainTail, int64, error) {
	if err := os.MkdirAll(filepath.Dir(l.path), 0o700); err != nil {
		return nil, chainTail{}, 0, fmt.Errorf("audit: %w", err)
	}
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, chainTail{}, 0, fmt.Errorf("audit: %w", err)
	}
	tail, cut, err := resume(f, l.chain, l.log)
	if err != nil {
		f.Close()
		return nil, chainTail{}, 0, fmt.Errorf("audit: %s: %w", l.path, err)
	}
	return f, tail, cut, nil
}

// resume reads the file's last line to continue the chain, and truncates
// a partial last line. It returns how many bytes it cut.
func resume(f *os.File, chain chainer, log *slog.Logger) (chainTail, int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return chainTail{}, 0, err
	}
	size := fi.Size()
	if size == 0 {
		return chainTail{}, 0, nil
	}
	// Read the tail: the last whole line ends at the last newline.
	n := min(size, 2*maxLine)
	tail := make([]byte, n)
	if _, err := f.ReadAt(tail, size-n); err != nil {
		return chainTail{}, 0, err
	}
	var cut int64
	if tail[len(tail)-1] != '\n' {
		i := bytes.LastIndexByte(tail, '\n')
		cut = int64(len(tail) - (i + 1))
		if err := f.Truncate(size - cut); err != nil {
			return chainTail{}, 0, err
		}
		tail = tail[:i+1]
		if len(tail) == 0 {
			return chainTail{}, cut, nil
		}
	}
	body := tail[:len(tail)-1]
	last := body[bytes.LastIndexByte(body, '\n')+1:]
	var r Record
	if err := json.Unmarshal(last, &r); err != nil || r.Prev == "" {
		return chainTail{}, 0, errors.New("the last line is not an audit record; refusing to append to a file that is not a credbroker audit log")
	}
	if r.MAC != chain.mac() {
		// Switching between plain and HMAC chaining mid-file is fine for
		// Verify (each record says how it is linked to the next), but say
		// so: it is worth an operator's attention.
		log.Warn("audit: chaining method changed", "was", orPlain(r.MAC), "now", orPlain(chain.mac()))
	}
	return chainTail{found: true, prev: chain.link(last), seq: r.Seq}, cut, nil
}

// Reopen opens the log's path again, for log rotation: after the file was
// moved away, the new file starts a new chain (prev 64 zeros) whose first
// record, "reopened", names the seq and digest where the old file ended,
// and seq goes on counting. A file that still holds records is continued.
// If the path cannot be opened (or is not an audit log), the log keeps the
// file it had; an error writing the "reopened" record is reported as any
// write failure is (Healthy, Watch).
func (l *Log) Reopen() error {
	f, tail, cut, err := l.openFile()
	if err != nil {
		return err
	}
	l.mu.Lock()
	if l.f == nil {
		l.mu.Unlock()
		f.Close()
		return errors.New("audit: log is closed")
	}
	old := l.f
	endSeq, endHead := l.seq, l.prev
	l.f = f
	if tail.found {
		l.prev, l.seq = tail.prev, tail.seq
	} else {
		l.prev = Genesis
	}
	l.mu.Unlock()
	if err := old.Close(); err != nil {
		l.log.Warn("audit: closing the previous file", "err", err)
	}
	msg := fmt.Sprintf("reopened %s; the previous file ended at seq %d with head %s", l.path, endSeq, endHead)
	if cut > 0 {
		msg += fmt.Sprintf("; cut off %d bytes of a partial record at the end of this file", cut)
	}
	return l.Write(Record{Event: EventReopened, Outcome: OutcomeOK, Message: msg})
}

func orPlain(mac string) string {
	if mac == "" {
		return "sha256"
	}
	return mac
}

// Write appends r, filling Seq, Time (if zero), MAC and Prev. Strings are
// cleaned (valid UTF-8, bounded length). After failed writes, the first
// record that can be written again is preceded by a "resumed" record
// saying how many were lost.
func (l *Log) Write(r Record) error {
	r.clean()
	if r.Time.IsZero() {
		r.Time = l.now()
	}
	r.Time = r.Time.UTC()
	l.mu.Lock()
	if l.f == nil {
		l.mu.Unlock()
		return errors.New("audit: log is closed")
	}
	err := l.resumeLocked()
	if err == nil {
		err = l.writeLocked(r)
	}
	notify := l.noteLocked(err)
	l.mu.Unlock()
	notify()
	return err
}

// resumeLocked writes the "resumed" record after failed writes.
func (l *Log) resumeLocked() error {
	if l.err == nil {
		return nil
	}
	return l.writeLocked(Record{Time: l.now().UTC(), Event: EventResumed, Outcome: OutcomeError,
		Message: fmt.Sprintf("%d records could not be written since %s: %v", l.lost, l.failedAt.UTC().Format(time.RFC3339), l.err)})
}

func (l *Log) writeLocked(r Record) error {
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
		return fmt.Errorf("audit: write: %w", err)
	}
	l.seq = r.Seq
	l.prev = l.chain.link(line)
	return nil
}

// noteLocked records the outcome of a write and returns what to call,
// without the lock, to tell the watchers of a change.
func (l *Log) noteLocked(err error) func() {
	was := l.err
	if err != nil {
		if was == nil {
			l.failedAt = l.now()
			l.lost = 0
		}
		l.lost++
		l.err = err
	} else {
		l.err, l.lost = nil, 0
	}
	if (was == nil) == (err == nil) {
		return func() {}
	}
	if err != nil {
		go l.retryLoop()
	}
	watchers := slices.Clone(l.watchers)
	return func() {
		for _, fn := range watchers {
			fn(err)
		}
	}
}

// retryLoop tries to write again every l.retry while writes fail, until
// one succeeds or the log is closed.
func (l *Log) retryLoop() {
	t := time.NewTicker(l.retry)
	defer t.Stop()
	for {
		select {
		case <-l.closed:
			return
		case <-t.C:
			if l.Healthy() == nil {
				return
			}
		}
	}
}

// Healthy returns nil if records can be written. After a failed write it
// tries once more (writing the "resumed" record) before saying no.
func (l *Log) Healthy() error {
	l.mu.Lock()
	if l.f == nil {
		l.mu.Unlock()
		return errors.New("audit: log is closed")
	}
	if l.err == nil {
		l.mu.Unlock()
		return nil
	}
	err := l.resumeLocked()
	var notify func()
	if err == nil {
		notify = l.noteLocked(nil)
	} else {
		l.err = err // still failing; nothing was lost by trying
		notify = func() {}
	}
	l.mu.Unlock()
	notify()
	return err
}

// Watch calls fn, without the log's lock held, each time writes start to
// fail (with the error) and each time they succeed again (with nil).
func (l *Log) Watch(fn func(error)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.watchers = append(l.watchers, fn)
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
		Reason:   ev.Reason,
	}
	switch ev.Action {
	case broker.AuditFirstUse, broker.AuditRevoke, broker.AuditExpire:
		r.Usage = usageOf(ev.Usage)
	}
	if ev.Error != "" {
		r.Outcome, r.Message = OutcomeError, ev.Error
	}
	l.Record(r)
}

func usageOf(u broker.LeaseUsage) *LeaseUsage {
	at := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		t = t.UTC()
		return &t
	}
	return &LeaseUsage{
		PeakSessions: u.PeakSessions, SessionsSeen: u.SessionsSeen,
		FirstSeen: at(u.FirstSeen), LastSeen: at(u.LastSeen),
		ApplicationName: u.ApplicationName, ClientAddr: u.ClientAddr, LastQueryStart: at(u.LastQueryStart),
	}
}

// Err returns the error of the last write if it failed, nil otherwise.
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
	close(l.closed)
	err := errors.Join(l.f.Sync(), l.f.Close())
	l.f = nil
	return err
}
