package broker

import "context"

// LeaseFeed is an optional interface of a LeaseStore that several brokers
// share (store/etcd): it follows the changes every instance of the group
// makes, so each instance keeps its expiry queue, its KeepAlive streams and
// its quota counts right for leases issued, renewed and ended elsewhere.
// A store that only one process writes (bbolt, memstore) need not
// implement it: that process sees its own writes.
//
// Backend: a consistent scan at revision R, then a watch from R+1 (etcd:
// Get WithRev(R) in pages, then Watch WithRev(R+1) on the lease and stream
// sections). The watch must never lose a change silently: when it cannot
// resume where it stopped (etcd: the revision was compacted), the backend
// scans again at a new revision and delivers a FeedReset, which replaces
// everything the caller knew.
type LeaseFeed interface {
	// FollowLeases calls fn with a FeedReset first, then with every change
	// after the reset's revision, in revision order, from one goroutine,
	// until ctx ends (it returns ctx.Err()) or the store is closed
	// (ErrClosed). Transient failures (a member down, a dropped
	// connection, a compaction) are retried inside, with backoff; a
	// reset follows any gap. fn must be quick and must not call the
	// feed; it may call the store.
	FollowLeases(ctx context.Context, fn func(FeedEvent)) error
}

// StreamMarker is an optional interface of a shared LeaseStore: it records
// which leases have a KeepAlive stream open on which instance of the group,
// so that the instance that runs the disconnect revocations (the leader)
// knows of streams held by the others. A mark outlives neither its
// instance nor its removal: it is removed by UnmarkStream, and by the store
// when the instance that wrote it stops renewing its session (a crash, or
// cut off from the store for longer than the session TTL). Marks reach the
// other instances through LeaseFeed (FeedStreamOpen, FeedStreamClosed).
//
// Backend: one key per (lease, instance), attached to a session lease of
// the writing process (etcd: Put WithLease of a lease kept alive, re-put
// under a new lease if that one expires while the process lives).
type StreamMarker interface {
	MarkStream(ctx context.Context, instance, leaseID string) error
	UnmarkStream(ctx context.Context, instance, leaseID string) error
}

// FeedKind says what a FeedEvent reports.
type FeedKind int

const (
	// FeedReset: the state at Revision: every live lease (Leases) and
	// every stream mark (Streams). It replaces what the caller knew.
	FeedReset FeedKind = iota + 1
	// FeedLease: a lease record was written (Lease; Created when this
	// write created it).
	FeedLease
	// FeedLeaseDeleted: a lease record was deleted (LeaseID): purged, or
	// DeleteLease.
	FeedLeaseDeleted
	// FeedStreamOpen and FeedStreamClosed: Stream was marked or unmarked
	// (or its instance's session ended).
	FeedStreamOpen
	FeedStreamClosed
)

// StreamMark is one instance's KeepAlive stream naming a lease.
type StreamMark struct {
	LeaseID  string
	Instance string
}

// FeedEvent is one step of LeaseFeed.FollowLeases.
type FeedEvent struct {
	Kind FeedKind
	// Revision is the store's revision of the change (of the scan, for a
	// reset). It grows from event to event.
	Revision uint64
	Lease    Lease
	Created  bool
	LeaseID  string
	Stream   StreamMark
	// For FeedReset: the live leases and the stream marks at Revision.
	Leases  []Lease
	Streams []StreamMark
}
