package broker

import "context"

// Optional reads a LeaseStore may offer where one read per lease is
// expensive (etcd: every GetLease is a linearizable read through raft).
// The broker uses them when the store has them and falls back to GetLease
// otherwise; store/storetest checks that they agree with GetLease.

// LeasesReader reads many leases in one request.
type LeasesReader interface {
	// GetLeases returns, per id, what GetLease would: the lease or an
	// error (ErrLeaseNotFound, or the store's own failure). Both slices
	// have len(ids) entries. The reads are as fresh as GetLease's (each
	// one sees every write that completed before the call began).
	//
	// Backend: one read of many keys (etcd: a Txn of Gets, at most 128).
	GetLeases(ctx context.Context, ids []string) ([]Lease, []error)
}

// LeaseHinter reads a lease cheaply, possibly stale: a version that was
// current at some point, but maybe not the latest. It serves only as a
// routing hint; whatever the broker decides from it is checked again by
// a fresh read or by a write's compare-and-set.
type LeaseHinter interface {
	// LeaseHint returns the lease as some recent version, or
	// ErrLeaseNotFound (which may also be stale).
	//
	// Backend: etcd: a serializable Get, answered by one member alone.
	LeaseHint(ctx context.Context, id string) (Lease, error)
	// LeaseHints is LeaseHint of many leases, in one request at most.
	LeaseHints(ctx context.Context, ids []string) ([]Lease, []error)
}

// getLeases reads ids through LeasesReader when the store has it.
func (b *Broker) getLeases(ctx context.Context, ids []string) ([]Lease, []error) {
	if r, ok := b.store.(LeasesReader); ok {
		return r.GetLeases(ctx, ids)
	}
	out := make([]Lease, len(ids))
	errs := make([]error, len(ids))
	for i, id := range ids {
		out[i], errs[i] = b.store.GetLease(ctx, id)
	}
	return out, errs
}

// leaseHints reads ids for a batch that writes what it decides with a
// compare-and-set: hints when the store has them (fresh false: what the
// batch would answer without a write needs a fresh read), else GetLeases.
func (b *Broker) leaseHints(ctx context.Context, ids []string) (ls []Lease, errs []error, fresh bool) {
	if h, ok := b.store.(LeaseHinter); ok {
		ls, errs = h.LeaseHints(ctx, ids)
		return ls, errs, false
	}
	ls, errs = b.getLeases(ctx, ids)
	return ls, errs, true
}

// leaseHint reads id through LeaseHinter when the store has it.
func (b *Broker) leaseHint(ctx context.Context, id string) (Lease, error) {
	if h, ok := b.store.(LeaseHinter); ok {
		return h.LeaseHint(ctx, id)
	}
	return b.store.GetLease(ctx, id)
}
