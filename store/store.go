package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/credbroker/credbroker/broker"
)

var (
	_ broker.LeaseStore       = (*Store)(nil)
	_ broker.LastIssuedReader = (*Store)(nil)
)

// DefaultTimeout is how long Open waits for the file lock when
// Options.Timeout is zero.
const DefaultTimeout = 5 * time.Second

// ErrLocked is returned by Open when another process holds the store file.
// bbolt locks the file exclusively, so two brokers can never share it.
var ErrLocked = errors.New("lease store file is locked by another process")

// Options tune Open. The zero value is what production wants.
type Options struct {
	// Timeout bounds the wait for the file lock (default DefaultTimeout).
	// bbolt's own zero means "wait forever", which would hang a second
	// brokerd silently; here zero means the default.
	Timeout time.Duration
	// NoSync skips fsync on commit. A crash may then lose acknowledged
	// writes or corrupt the file: for tests and benchmarks only.
	NoSync bool
	// Logger receives the few events worth an operator's attention;
	// nil discards them.
	Logger *slog.Logger
	// CommitObserver, when set, is called with the duration of every
	// read-write transaction after it commits or fails (a group commit
	// counts once, however many writes share it). It runs on the store's
	// writer, so it must be quick: a histogram's Observe.
	CommitObserver func(time.Duration)
}

// Store is the bbolt implementation of broker.LeaseStore. It is safe for
// concurrent use.
type Store struct {
	db     *bolt.DB
	path   string
	log    *slog.Logger
	closed atomic.Bool
	// observe is Options.CommitObserver, or nil.
	observe func(time.Duration)
	// commits is the group commit of request writes; see write.
	commits *committer
}

// Open opens or creates the store at path. A missing parent directory is
// created with mode 0700 and a new file with mode 0600.
func Open(path string, opts Options) (*Store, error) {
	if path == "" {
		return nil, fmt.Errorf("open lease store: %w: empty path", broker.ErrInvalidArgument)
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("store_path", path)

	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open lease store %s: create directory: %w", path, err)
	}
	// The file names every user the broker made; a file an operator
	// loosened is worth a warning, but tightening it behind their back
	// (say, for a backup agent's group) is not the store's call.
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		log.Warn("lease store file is accessible to other users; expected mode 0600", "mode", fi.Mode().Perm().String())
	}

	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout, NoSync: opts.NoSync})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("open lease store %s: %w (gave up after %s; is another brokerd using this file?)", path, ErrLocked, timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("open lease store %s: %w", path, err)
	}
	version, err := initSchema(db, log)
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open lease store %s: %w", path, err)
	}
	log.Debug("lease store opened", "schema_version", version)
	return &Store{db: db, path: path, log: log, observe: opts.CommitObserver, commits: newCommitter(db, opts.CommitObserver)}, nil
}

// initSchema creates the buckets of a new file, checks the schema version
// of an existing one and migrates an older one to schemaVersion, all in one
// transaction: a crash leaves the file as it was or fully migrated. It
// returns the file's version, after any migration.
func initSchema(db *bolt.DB, log *slog.Logger) (uint64, error) {
	var version uint64
	err := db.Update(func(tx *bolt.Tx) error {
		// A bucket a version 1 file lacks is created here, empty, and
		// filled by its migration below; a new file's stays empty.
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return fmt.Errorf("create bucket %s: %w", name, err)
			}
		}
		meta := tx.Bucket(bucketMeta)
		raw := meta.Get(metaKeySchemaVersion)
		if raw == nil {
			version = schemaVersion
			return meta.Put(metaKeySchemaVersion, encodeSchemaVersion(schemaVersion))
		}
		v, err := decodeSchemaVersion(raw)
		if err != nil {
			return err
		}
		version = v
		if v > schemaVersion {
			return fmt.Errorf("schema version %d is newer than this binary supports (%d); run a newer credbroker", v, schemaVersion)
		}
		if v < 2 {
			log.Info("building the role activity index from the lease records (once, on upgrade to schema version 2)")
			if err := buildActivity(tx, log); err != nil {
				return fmt.Errorf("migrate schema version %d to 2: build activity: %w", v, err)
			}
		}
		if v < schemaVersion {
			version = schemaVersion
			return meta.Put(metaKeySchemaVersion, encodeSchemaVersion(schemaVersion))
		}
		return nil
	})
	return version, err
}

// Close releases the file lock. It waits for transactions in flight; every
// later call returns broker.ErrClosed. Closing twice is not an error.
func (s *Store) Close() error {
	if !s.closed.CompareAndSwap(false, true) {
		return nil
	}
	// Writes already queued are committed; later ones get ErrClosed.
	s.commits.stop()
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close lease store %s: %w", s.path, err)
	}
	return nil
}

// Size returns the size of the store file in bytes. bbolt never shrinks the
// file by itself (freed pages are reused), so this is what an operator sees
// on disk.
func (s *Store) Size() (int64, error) {
	if s.closed.Load() {
		return 0, broker.ErrClosed
	}
	fi, err := os.Stat(s.path)
	if err != nil {
		return 0, fmt.Errorf("lease store size: %w", err)
	}
	return fi.Size(), nil
}

func (s *Store) ready(ctx context.Context) error {
	if s.closed.Load() {
		return broker.ErrClosed
	}
	return ctx.Err()
}

// mapErr turns bbolt's "not open" (a call that raced Close) into the
// broker's sentinel, so callers only ever test for broker.ErrClosed.
func mapErr(err error) error {
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return broker.ErrClosed
	}
	return err
}

// view runs fn in a read-only transaction. fn must copy out everything it
// keeps: bbolt values are only valid inside the transaction.
func (s *Store) view(ctx context.Context, fn func(*bolt.Tx) error) error {
	if err := s.ready(ctx); err != nil {
		return err
	}
	return mapErr(s.db.View(fn))
}

// write runs fn in a read-write transaction shared with the other writes
// queued meanwhile: group commit, one commit and one fsync for all of them
// (see committer). A lone write commits at once; nothing waits for company.
//
// A commit the disk refuses fails every write of its group with an error
// wrapping broker.ErrUnavailable (see ioerror.go); none of them is done.
//
// fn may run more than once (when another member of its group fails, the
// group is rolled back and run again without it), so fn must be
// idempotent: no side effects outside tx, and any result it sets must be
// reset at its start.
func (s *Store) write(ctx context.Context, fn func(*bolt.Tx) error) error {
	if err := s.ready(ctx); err != nil {
		return err
	}
	return s.commits.do(fn)
}

// update runs fn alone in a read-write transaction, for maintenance writes
// (purges) too large to share a batch with request writes.
func (s *Store) update(ctx context.Context, fn func(*bolt.Tx) error) error {
	if err := s.ready(ctx); err != nil {
		return err
	}
	return timed(s.observe, func() error { return updateTx(s.db, fn) })
}
