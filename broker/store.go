package broker

import (
	"context"
	"io"
	"time"
)

// LeaseStore persists leases and intents. Every operation is one a
// distributed KV such as etcd v3 can implement: a compare-and-set of one
// lease, a transaction over a few keys, an ordered range scan, a read at
// one consistent revision. This comment and the methods' are the whole
// contract; store/storetest checks it, and every backend must pass that
// suite. Nothing outside store/ may depend on which backend it runs on.
//
// # Keys a backend keeps
//
// The operations below assume a backend holds, and changes together, four
// kinds of keys (bbolt: buckets; etcd: key prefixes under the group's
// prefix):
//
//   - lease records by id;
//   - intent records by lease id;
//   - the expiry index: one key per live lease (Active, Revoking,
//     RevokeFailed), ordered by the instant the lease needs attention, then
//     by id: its ExpireTime, or its EndTime when that is set and earlier
//     (an admin's revocation under way). A fixed-width big-endian time
//     followed by the id sorts correctly under byte order;
//   - the tombstone index: one key per terminal lease (Revoked, Expired),
//     ordered by EndTime, then by id.
//
// A lease record and its one index key always change in the same
// transaction: no reader may ever see a live lease missing from the expiry
// index, or a terminal one missing from the tombstone index. Every write
// below that touches a lease therefore needs a multi-key transaction (etcd:
// one Txn, which holds at most 128 operations).
//
// # Revisions
//
// Lease.Revision is the version of a stored lease, for compare-and-set. The
// store sets it; callers only pass back what they read. It is never 0 for a
// stored lease and grows with every successful write of that lease, so a
// larger revision is a newer version (server/ orders stream updates by it).
// Callers must not assume more: bbolt counts 1, 2, 3... per lease; an etcd
// backend may use the record's mod revision, which jumps.
//
// # Errors
//
// Implementations return, wrapped or not (callers use errors.Is):
// ErrLeaseNotFound for a missing lease, ErrConflict when a compare-and-set
// loses, ErrExists when creating a lease whose id is taken,
// ErrInvalidArgument for a record the store will not hold (see CreateLease),
// and ErrClosed from every method after Close.
//
// A write the backend itself failed (bbolt: the disk is full or read-only,
// an I/O error; etcd: no quorum) wraps ErrUnavailable, so the broker's
// callers hear Unavailable and the broker retries its own writes; unless
// it also wraps ErrUnknownOutcome, it did not commit. The backend maps
// these errors, being the one that can tell them from its own checks.
//
// # Contexts and unknown outcomes
//
// A call whose context is already done returns ctx.Err() and changes
// nothing. A context that ends while a write is in flight may leave the
// write done or not done: the caller re-reads rather than assume either
// (bbolt commits a write it has queued whatever the context says). Long
// scans check their context as they go.
//
// A write whose outcome the backend cannot know (etcd: the request timed
// out or the connection dropped after it was sent) returns an error
// wrapping ErrUnknownOutcome, never a plain error that reads as "not
// done". Every other error of a write means it did not commit. The caller
// re-reads before it undoes anything: the broker's issue path reads the
// lease back after a failed CreateLease and keeps the credential when the
// lease is there. A backend should return ErrUnknownOutcome only once a
// late commit has become unlikely (etcd: after a linearizable read of the
// key), since the caller's re-read decides; the broker still queues such a
// lease for expiry, so a write that lands later is revoked on time.
//
// Every method is safe for concurrent use.
type LeaseStore interface {
	// PutIntent records, before CREATE ROLE, that a user is about to be
	// created; it replaces any intent of the same id. It must be durable
	// when it returns, which is why it is a write of its own. An intent
	// without a LeaseID is ErrInvalidArgument.
	//
	// Backend: a put of one key.
	PutIntent(ctx context.Context, in Intent) error
	// DeleteIntent removes the intent of that lease id; a missing intent is
	// not an error.
	//
	// Backend: a delete of one key.
	DeleteIntent(ctx context.Context, leaseID string) error
	// ListIntents returns every intent, in ascending lease id order
	// (bytewise), from one consistent read. Intents are few (issues in
	// flight, plus what a crash left), so there is no paging.
	//
	// Backend: a range read of the intent keys at one revision.
	ListIntents(ctx context.Context) ([]Intent, error)

	// CreateLease stores a new lease at its first revision and sets
	// l.Revision to it (whatever l.Revision held). In the same
	// transaction it deletes the intent of the same id, adds the lease's
	// index key, and moves the role's last issue time forward (see
	// LastIssuedReader); so a crash leaves either the intent or the lease,
	// never neither. A lease whose id is stored already is ErrExists and
	// changes nothing (of two concurrent creates of one id, exactly one
	// wins).
	//
	// A lease the store will not hold is ErrInvalidArgument and changes
	// nothing, l.Revision included: an empty id; a state neither live nor
	// terminal; a live lease without ExpireTime or a terminal one without
	// EndTime (it would have no index key); a time outside what a fixed
	// width index key holds (before 1970 or after 2262); a negative
	// RevokeAttempts. A backend may also bound the id's length.
	//
	// Backend: a multi-key transaction guarded by "the lease key does not
	// exist" (etcd: Compare(CreateRevision(key), "=", 0)), putting the
	// record and its index key, deleting the intent key and putting the
	// activity key (a read-modify-write, so it joins the compare set).
	CreateLease(ctx context.Context, l *Lease) error
	// UpdateLease writes l in place of the stored lease if the stored
	// revision still equals l.Revision, moving its index key when the state,
	// ExpireTime or EndTime changed, and returns the lease as a later
	// GetLease would (with its new revision). It is ErrLeaseNotFound when
	// no lease has that id, ErrConflict when the revision differs (older or
	// newer), ErrInvalidArgument as for CreateLease; each leaves the stored
	// lease untouched. Concurrent updates based on one revision have
	// exactly one winner.
	//
	// Backend: a compare-and-set of one key inside a multi-key transaction
	// (etcd: Compare(ModRevision(key), "=", rev), then put the record,
	// delete the old index key and put the new one). The old index key is
	// derived from the stored record, so it is read with the compare.
	UpdateLease(ctx context.Context, l Lease) (Lease, error)
	// UpdateLeases is UpdateLease for many leases at once, for the batched
	// renewals and revocations: it returns a lease and an error per entry
	// (both slices have len(ls) entries; a failed entry's lease is the zero
	// Lease). Entries are independent: a missing, conflicting or invalid
	// lease fails only its own entry, and no caller relies on the entries
	// committing together. A lease named twice succeeds at most once, since
	// the first write moves its revision. A failure of the store itself
	// (closed, context done, I/O) fails the entries it covers.
	//
	// Backend: compare-and-set per entry. bbolt runs them all in one
	// transaction, skipping losers; etcd, whose Txn is all-or-nothing and
	// bounded to 128 operations, can read the revisions, then commit the
	// entries in groups, retrying a group without the entries whose
	// compare failed.
	UpdateLeases(ctx context.Context, ls []Lease) ([]Lease, []error)
	// GetLease returns the lease with that id, or ErrLeaseNotFound. The
	// result is the caller's: changing it, its Metadata included, does not
	// change the store. Times come back Equal to those stored, to the
	// nanosecond (in any location); empty Metadata may come back nil.
	//
	// Backend: a read of one key.
	GetLease(ctx context.Context, id string) (Lease, error)
	// DeleteLease removes a lease and its index key in one transaction; a
	// missing lease is not an error. The role's last issue time stays.
	//
	// Backend: a multi-key delete; the index key is derived from the
	// stored record, so read it first and guard the delete with its
	// revision.
	DeleteLease(ctx context.Context, id string) error
	// ListLeases returns the leases matching f (LeaseFilter.Match) in
	// ascending id order (bytewise), starting after f.After (which need not
	// exist). When f.Limit leases were returned and more match, the second
	// result is the last one's id, to pass as f.After for the next page;
	// otherwise it is "" (a page that ends the listing exactly promises no
	// more). A negative Limit is ErrInvalidArgument.
	//
	// Each page is one consistent read; pages are separate reads, so a
	// lease that exists for the whole listing appears exactly once and one
	// created or deleted meanwhile may or may not.
	//
	// Backend: an ordered range scan of the lease keys from f.After,
	// filtering as it goes and reading one match beyond the page to know
	// whether another page exists (etcd: ranges with WithFromKey and
	// WithLimit at one revision; there is no server-side filter).
	ListLeases(ctx context.Context, f LeaseFilter) ([]Lease, string, error)
	// ScanExpiry calls fn for each live lease (Active, Revoking,
	// RevokeFailed), in ascending order of ExpiryEntry.Expire, ties in id
	// order, until fn returns false; stopping early is not an error.
	// Terminal leases never appear. Expire is the instant the lease needs
	// attention (its ExpireTime, or its EndTime when that is set and
	// earlier), or an earlier one: an update that moves that instant
	// later and changes none of the entry's details (a renewal) may leave
	// the entry where it was (the etcd store does, to write one key per
	// renewal), but never one that moves it earlier. So Expire is never
	// late, and whoever acts on an entry reads the lease first (the
	// expiry manager does). An update moves a lease in this order, or out
	// of it, in the same transaction.
	//
	// All entries come from one consistent snapshot. fn must be quick and
	// must not call the store (bbolt holds a read transaction open while fn
	// runs; a write from fn can deadlock). Entries carry the lease's State,
	// Target, Username and RevokeOnDisconnect when the index holds them;
	// Username is "" when it does not, and the caller reads the lease.
	//
	// Backend: an ordered range scan of the expiry index, without reading
	// the lease records, at one revision (etcd: pages of Get with
	// WithRange and WithRev(r) of the first page; the new leader scans at
	// r and then watches from r+1).
	ScanExpiry(ctx context.Context, fn func(ExpiryEntry) bool) error
	// PurgeTombstones deletes terminal leases (Revoked, Expired) whose
	// EndTime is strictly before endedBefore, oldest EndTime first (ties in
	// id order), at most limit of them, with their index keys, and returns
	// how many it deleted. It deletes fewer than limit only when no more
	// qualify: the broker calls it again while it returns limit. Live
	// leases are never deleted, whatever endedBefore is. Roles' last issue
	// times stay. A limit below 1 is ErrInvalidArgument.
	//
	// Backend: an ordered range scan of the tombstone index up to
	// endedBefore, then multi-key deletes of records and index keys, each
	// guarded by the record's revision (a lease rewritten meanwhile is not
	// deleted). bbolt does it in one transaction; etcd needs several, of at
	// most 64 leases each (two deletes per lease).
	PurgeTombstones(ctx context.Context, endedBefore time.Time, limit int) (int, error)
	// GroupID returns the identity of the broker group this store belongs
	// to: a random id (NewGroupID) created by the first call on a new
	// store and returned unchanged by every later call, across restarts
	// and by every instance sharing the store. A broker records it as the
	// owner of each target's marker role (DESIGN.md "A broker group owns
	// its marker role"), so that two groups on one PostgreSQL cluster
	// never drop each other's users; it is kept in the store because the
	// store is what makes a group (one bbolt file, or one etcd prefix). Of
	// two concurrent first calls, both return the same id: the creation
	// is atomic.
	//
	// Backend: one key, read and, when absent, created under "the key
	// does not exist" (bbolt: the meta bucket, in one write transaction;
	// etcd: Txn(Compare(CreateRevision(prefix+"group_id"), "=", 0),
	// Put) falling back to a Get when the compare fails, so a loser of
	// the race returns the winner's id).
	GroupID(ctx context.Context) (string, error)

	// Snapshot writes to w a consistent copy of the whole store, every
	// key as of one instant (one read transaction or revision), for a
	// backup: the backend's own format, which its restore reads back
	// (bbolt: a bbolt file, to put at store.path; etcd: an export of the
	// prefix that etcd.Restore loads into an empty prefix). Writes go on
	// while it runs and are not in the copy. A store restored from it
	// answers every read as this store did at that instant. It returns
	// the bytes written.
	//
	// Backend: one read of every key at one revision (bbolt: Tx.WriteTo
	// in a read transaction; etcd: a ranged Get of the prefix, paged,
	// pinned to the first page's revision).
	Snapshot(ctx context.Context, w io.Writer) (int64, error)

	// Close releases the store. Writes in flight finish first; every later
	// call of any method returns ErrClosed. Closing twice is not an error.
	Close() error
}

// LastIssuedReader is a lease store that keeps each broker role's newest
// issue time itself, so the least-privilege check's stale test reads one
// entry per role instead of every lease. Its memory is longer than the
// leases': CreateLease moves a role's entry forward in its own
// transaction, and neither DeleteLease nor PurgeTombstones moves it back,
// so a role's last issue stays known after the retention has dropped the
// lease.
type LastIssuedReader interface {
	// LastIssued maps each role that ever had a lease in the store to the
	// issue time of its newest one (the latest IssueTime, not that of the
	// last created); a role with none, or leases created with an empty
	// role or zero IssueTime, is absent. It is one consistent read.
	//
	// Backend: one key per role name, written by CreateLease only if it
	// moves forward (a read-modify-write in CreateLease's transaction;
	// etcd: compare the key's mod revision); read here with one range
	// read of those keys.
	LastIssued(ctx context.Context) (map[string]time.Time, error)
}
