// Package etcd is the broker.LeaseStore on etcd v3, for a group of brokers
// that share one store (docs: DESIGN "High availability on etcd"). It owns
// the key layout under the group's prefix (schema.go), the transactions
// that keep a lease and its index key together, and the mapping of etcd's
// limits and failures onto the store's contract (broker/store.go): at most
// 128 operations and about 1.5 MiB per Txn, consistent scans at one
// revision, and timeouts reported as broker.ErrUnknownOutcome.
//
// Every write is one Txn guarded by the lease key's revision (mod revision
// for updates and deletes, create revision 0 for creates), and
// Lease.Revision is that key's mod revision.
package etcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
)

// Defaults of Options.
const (
	// DefaultPrefix is the key prefix of a broker group.
	DefaultPrefix = "/credbroker/"
	// DefaultDialTimeout bounds Open's first contact with the cluster.
	DefaultDialTimeout = 5 * time.Second
	// DefaultRequestTimeout bounds each request to etcd whose context has
	// no earlier deadline; a write that runs out of it has an unknown
	// outcome.
	DefaultRequestTimeout = 5 * time.Second
	// DefaultMarkTTL is Options.SessionTTL's default, DESIGN's
	// session_ttl (the leadership session's default too).
	DefaultMarkTTL = 10 * time.Second
)

// etcd's limits (the server's defaults, which a cluster may lower but
// rarely does): operations per Txn (--max-txn-ops) and bytes per request
// (--max-request-bytes, 1.5 MiB). Batches stay below both with room for
// the request's framing.
const (
	maxTxnOps   = 128
	maxTxnBytes = 1 << 20
	// maxScanRestarts bounds how often a scan starts again because the
	// revision it reads at was compacted meanwhile.
	maxScanRestarts = 5
)

// scanPage is how many keys one range read of a scan returns (a variable
// for tests, which page through few keys).
var scanPage int64 = 500

// testHookPage, when set (by tests), runs after each range read of a
// scan, before the next.
var testHookPage func()

// testHookUpdateRead, when set (by tests), runs in UpdateLeases between
// reading the records and committing them.
var testHookUpdateRead func()

// TLSFiles names PEM files for TLS to etcd; all empty means plaintext.
type TLSFiles struct {
	CAFile   string
	CertFile string
	KeyFile  string
}

// Options configures Open.
type Options struct {
	// Endpoints are the cluster's client URLs.
	Endpoints []string
	// Prefix is the broker group's key prefix (default DefaultPrefix); it
	// must end in "/" (CheckPrefix).
	Prefix string
	// DialTimeout bounds Open's first request (default DefaultDialTimeout).
	DialTimeout time.Duration
	// RequestTimeout bounds each request (default DefaultRequestTimeout).
	RequestTimeout time.Duration
	TLS            TLSFiles
	// Username and Password for etcd authentication; the caller reads
	// the password (from store.etcd.password_file).
	Username string
	Password string
	// Logger receives the store's and the etcd client's logs (default:
	// discarded).
	Logger *slog.Logger
	// SessionTTL is the TTL of the session lease this process's stream
	// marks live on (broker.StreamMarker): how long after a crash of this
	// process the other instances still count its KeepAlive streams
	// (default DefaultMarkTTL; store.etcd.session_ttl).
	SessionTTL time.Duration
}

// CheckPrefix refuses a prefix that is empty or does not end in "/": one
// group's keys must never be a prefix of another's ("/credbroker" would
// also cover "/credbroker2/...").
func CheckPrefix(prefix string) error {
	if prefix == "" || !strings.HasSuffix(prefix, "/") {
		return fmt.Errorf("%w: etcd prefix %q must be non-empty and end in \"/\"", broker.ErrInvalidArgument, prefix)
	}
	return nil
}

// Store is a broker.LeaseStore and broker.LastIssuedReader on etcd.
type Store struct {
	cli            *clientv3.Client
	keys           keys
	requestTimeout time.Duration
	log            *slog.Logger

	// mu is held shared by every call for its whole duration and
	// exclusively by Close, so Close waits for calls in flight and every
	// later call sees closed.
	mu     sync.RWMutex
	closed bool

	// doneCtx ends when Close begins: what runs for long (the change
	// feed, the stream marks' session) stops on it, rather than hold mu.
	doneCtx    context.Context
	doneCancel context.CancelFunc

	// marks are this process's stream marks and the session lease they
	// live on (marks.go).
	marks markSession

	// indexes remembers leases' index keys by mod revision, so that an
	// update needs no read first (indexcache.go).
	indexes indexCache
	// group merges concurrent unfenced PutIntents and CreateLeases into
	// one Txn (groupcommit.go).
	group groupCommitter
	// reads and writes count the requests sent to etcd (for tests).
	reads, writes atomic.Int64
}

var (
	_ broker.LeaseStore       = (*Store)(nil)
	_ broker.LastIssuedReader = (*Store)(nil)
)

// Open connects to the cluster and checks that it answers within
// DialTimeout. The store owns the client: Close closes it.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if err := CheckPrefix(opts.Prefix); err != nil {
		return nil, err
	}
	if len(opts.Endpoints) == 0 {
		return nil, fmt.Errorf("%w: no etcd endpoints", broker.ErrInvalidArgument)
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = DefaultDialTimeout
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = DefaultRequestTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg := clientv3.Config{
		Endpoints:   opts.Endpoints,
		DialTimeout: opts.DialTimeout,
		Username:    opts.Username,
		Password:    opts.Password,
		Logger:      zap.New(newZapCore(log.Handler())),
		// Writes up to maxTxnBytes plus framing; the server enforces
		// its own limit.
		MaxCallSendMsgSize: 2 << 20,
	}
	if opts.TLS != (TLSFiles{}) {
		info := transport.TLSInfo{CertFile: opts.TLS.CertFile, KeyFile: opts.TLS.KeyFile, TrustedCAFile: opts.TLS.CAFile}
		tc, err := info.ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
		cfg.TLS = tc
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	s := &Store{cli: cli, keys: keys{prefix: opts.Prefix}, requestTimeout: opts.RequestTimeout, log: log}
	s.doneCtx, s.doneCancel = context.WithCancel(context.Background())
	s.marks.init(opts.SessionTTL)
	// The client connects lazily; a linearizable read proves there is a
	// cluster with a leader, and that the credentials are good.
	pctx, cancel := context.WithTimeout(ctx, opts.DialTimeout)
	defer cancel()
	if _, err := cli.Get(pctx, s.keys.group(), clientv3.WithCountOnly()); err != nil {
		_ = cli.Close()
		return nil, fmt.Errorf("etcd %v: %w", opts.Endpoints, err)
	}
	return s, nil
}

// Client returns the store's etcd client, for what shares its connection
// (leader election). It is closed by Close.
func (s *Store) Client() *clientv3.Client { return s.cli }

// Close waits for calls in flight, then closes the client. Every later
// call returns broker.ErrClosed.
func (s *Store) Close() error {
	s.doneCancel()
	s.marks.stop(s) // before the lock: its session loop takes it
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.cli.Close()
}

// enter starts a call: ErrClosed after Close, ctx.Err() when ctx is done.
// The caller runs the returned release when the call ends.
func (s *Store) enter(ctx context.Context) (release func(), err error) {
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return nil, broker.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		s.mu.RUnlock()
		return nil, err
	}
	return s.mu.RUnlock, nil
}

// request bounds one request to etcd by the request timeout.
func (s *Store) request(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.requestTimeout)
}

// get is a read of one request.
func (s *Store) get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	rctx, cancel := s.request(ctx)
	defer cancel()
	s.reads.Add(1)
	return s.cli.Get(rctx, key, opts...)
}

// commit runs one write Txn. Its error is errWrite's.
//
// A write under a leadership term (broker.FenceFrom(ctx)) is fenced: the
// Txn is nested in one that compares the election key's create revision,
// so a broker deposed while the write was in flight changes nothing and
// gets broker.ErrNotLeader; the caller sees the inner Txn's response, as
// if unfenced.
func (s *Store) commit(ctx context.Context, op string, cmps []clientv3.Cmp, then, els []clientv3.Op) (*clientv3.TxnResponse, error) {
	rctx, cancel := s.request(ctx)
	defer cancel()
	s.writes.Add(1)
	fence, fenced := broker.FenceFrom(ctx)
	if !fenced {
		resp, err := s.cli.Txn(rctx).If(cmps...).Then(then...).Else(els...).Commit()
		if err != nil {
			return nil, errWrite(op, err)
		}
		return resp, nil
	}
	resp, err := s.cli.Txn(rctx).
		If(clientv3.Compare(clientv3.CreateRevision(fence.Key), "=", fence.Revision)).
		Then(clientv3.OpTxn(cmps, then, els)).
		Commit()
	if err != nil {
		return nil, errWrite(op, err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("etcd %s: %w: the leadership term of %s (revision %d) has ended; the write was refused",
			op, broker.ErrNotLeader, fence.Key, fence.Revision)
	}
	inner := (*clientv3.TxnResponse)(resp.Responses[0].GetResponseTxn())
	inner.Header = resp.Header
	return inner, nil
}

// readTxn runs a Txn of reads only (ops are Gets), at one revision.
func (s *Store) readTxn(ctx context.Context, ops []clientv3.Op) (*clientv3.TxnResponse, error) {
	rctx, cancel := s.request(ctx)
	defer cancel()
	s.reads.Add(1)
	return s.cli.Txn(rctx).Then(ops...).Commit()
}

// errWrite classifies a failed write. etcd refused some requests before
// applying anything (malformed, too large, too many operations, no
// permission, no space); any other failure, a timeout or a lost
// connection above all, may have come after the write was applied, and
// so is broker.ErrUnknownOutcome: the caller re-reads.
func errWrite(op string, err error) error {
	if refused(err) {
		return fmt.Errorf("etcd %s: %w", op, err)
	}
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("etcd %s: %w: %w", op, broker.ErrUnknownOutcome, err)
	}
	// etcd could not be reached or has no quorum: callers answer
	// Unavailable (the broker's issue path undoes what it can).
	return fmt.Errorf("etcd %s: %w: %w: %w", op, broker.ErrUnavailable, broker.ErrUnknownOutcome, err)
}

func refused(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var code codes.Code
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		code = ee.Code()
	} else if st, ok := status.FromError(err); ok {
		code = st.Code()
	} else {
		return false
	}
	switch code {
	case codes.InvalidArgument, codes.FailedPrecondition, codes.PermissionDenied, codes.Unauthenticated,
		codes.ResourceExhausted, codes.OutOfRange, codes.AlreadyExists, codes.NotFound:
		return true
	}
	return false
}

// errRead wraps a failed read: one etcd did not refuse (a timeout, no
// quorum, no connection) is broker.ErrUnavailable.
func errRead(op string, err error) error {
	if refused(err) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("etcd %s: %w", op, err)
	}
	return fmt.Errorf("etcd %s: %w: %w", op, broker.ErrUnavailable, err)
}

// PutIntent writes the intent's key.
func (s *Store) PutIntent(ctx context.Context, in broker.Intent) error {
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	v, err := encodeIntent(&in)
	if err != nil {
		return err
	}
	key := s.keys.intent(in.LeaseID)
	_, err = s.commitGrouped(ctx, &groupWrite{op: "PutIntent", then: []clientv3.Op{clientv3.OpPut(key, string(v))},
		keys: []string{key}, size: len(key) + len(v)})
	return err
}

// DeleteIntent deletes the intent's key.
func (s *Store) DeleteIntent(ctx context.Context, leaseID string) error {
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	_, err = s.commit(ctx, "DeleteIntent", nil, []clientv3.Op{clientv3.OpDelete(s.keys.intent(leaseID))}, nil)
	return err
}

// GroupID returns the broker group's id, creating a random one under the
// prefix if there is none: of brokers that start together on an empty
// prefix, one creates it and all return it.
func (s *Store) GroupID(ctx context.Context) (string, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return "", err
	}
	defer release()
	key := s.keys.group()
	resp, err := s.get(ctx, key)
	if err != nil {
		return "", errRead("GroupID", err)
	}
	if len(resp.Kvs) == 1 {
		return string(resp.Kvs[0].Value), nil
	}
	id := broker.NewGroupID()
	txn, err := s.commit(ctx, "GroupID",
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(key, id)},
		[]clientv3.Op{clientv3.OpGet(key)})
	if err != nil {
		return "", err
	}
	if txn.Succeeded {
		return id, nil
	}
	kvs := txn.Responses[0].GetResponseRange().Kvs
	if len(kvs) != 1 {
		return "", fmt.Errorf("etcd GroupID: %w: the group key vanished", broker.ErrConflict)
	}
	return string(kvs[0].Value), nil
}
