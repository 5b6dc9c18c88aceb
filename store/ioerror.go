package store

import (
	"errors"
	"fmt"
	"syscall"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/credbroker/credbroker/broker"
)

// A write the disk refused (full: ENOSPC or EDQUOT; read-only: EROFS; a
// failing device: EIO; or any other error of bbolt's commit: growing the
// file, writing its pages, fsync) is a storage failure, and the store
// reports it wrapped in broker.ErrUnavailable: the broker answers the caller
// Unavailable (server/errors.go) and retries its own writes (revocations go
// back in the expiry queue with backoff). The store, not the broker, maps
// these errors, because only the store can tell an error of its backend
// from one of its own checks (ErrConflict, ErrInvalidArgument...); it does
// so by where the error comes from, not by its errno, since bbolt flattens
// some of them to text ("file resize error: ...").
//
// The bbolt handle stays usable after such a failure, and the store does
// not reopen it: a commit that fails before its meta page is written
// leaves the file's last committed state intact (bbolt writes data pages
// first, to pages no committed state uses, and the meta page last), and
// bbolt (v1.4 on) reloads its free-page list from that state in its
// rollback, so the next commit starts clean. Once the disk takes writes
// again, so does the store, without a restart; TestWritesFailAndRecover
// OnAFullDisk checks this on a real full file system.
//
// What no store can settle: an fsync that fails after the meta page was
// written (EIO). bbolt reports the commit failed, though the page cache
// may hold it. The error is still a failure here; a later successful
// commit overwrites the other meta page, and the broker, which re-reads
// before it acts on a failed write of a lease, tolerates either outcome.

// storageError is a write the backend failed. Its text names the system
// error (errno) when there is one, without the file's path: it reaches
// callers (gRPC Unavailable), and the path is the operator's business (the
// store logs it when it opens).
type storageError struct{ err error }

func (e *storageError) Error() string {
	var errno syscall.Errno
	if errors.As(e.err, &errno) {
		return fmt.Sprintf("%s: lease store write failed: %s", broker.ErrUnavailable, errno.Error())
	}
	// No errno survived (bbolt formats some errors with %s): the text is
	// all there is.
	return fmt.Sprintf("%s: lease store write failed: %v", broker.ErrUnavailable, e.err)
}

// Unwrap keeps errors.Is working for the sentinel and for the system error
// (errors.Is(err, syscall.ENOSPC)).
func (e *storageError) Unwrap() []error { return []error{broker.ErrUnavailable, e.err} }

// updateTx runs fn in one read-write transaction. An error fn returns comes
// back as it is; an error of bbolt's own (beginning or committing the
// transaction) is a storage failure, wrapped in broker.ErrUnavailable,
// except bbolt's "not open" (a call that raced Close), which is
// broker.ErrClosed.
func updateTx(db *bolt.DB, fn func(*bolt.Tx) error) error {
	var fnErr error
	err := db.Update(func(tx *bolt.Tx) error {
		fnErr = fn(tx)
		return fnErr
	})
	if err == nil || fnErr != nil {
		return err
	}
	return commitError(err)
}

// commitError classifies an error bbolt returned for a transaction, not
// one of the store's functions.
func commitError(err error) error {
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return broker.ErrClosed
	}
	return &storageError{err: err}
}
