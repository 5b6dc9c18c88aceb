// Package memstore is an in-memory broker.LeaseStore for tests: the
// broker's domain logic (expiry, revocation, renewal, reconciliation) runs
// against it in milliseconds, with no file and no fsync.
//
// It is for tests only, not for production: nothing survives the process,
// so a crash would leave users no lease knows, which is what the store
// exists to prevent. It follows the semantics of the bbolt store (package
// store) exactly: the same sentinel errors, the same validation, revisions,
// orders and paging, and times come back in UTC without a monotonic
// reading, as from a file. The shared contract suite (store/storetest)
// holds both to that.
package memstore

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// ctxCheckEvery is how many entries a long scan passes between checks of
// its context, as in the bbolt store.
const ctxCheckEvery = 4096

// Store is an in-memory lease store. It is safe for concurrent use. The
// zero value is not usable; call New.
type Store struct {
	mu      sync.Mutex
	closed  bool
	leases  map[string]broker.Lease  // normalised copies
	intents map[string]broker.Intent // normalised copies
	// lastIssued is each role's newest issue time, as store.Store's
	// activity bucket: it only moves forward and nothing deletes it.
	lastIssued map[string]time.Time
	groupID    string // created by the first GroupID
}

var _ broker.LeaseStore = (*Store)(nil)

// New returns an empty store.
func New() *Store {
	return &Store{
		leases:     make(map[string]broker.Lease),
		intents:    make(map[string]broker.Intent),
		lastIssued: make(map[string]time.Time),
	}
}

// Close makes every later call return broker.ErrClosed. Closing twice is
// not an error.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}

// lock takes the store's lock once the store is open and ctx is live; on
// error the lock is not held.
func (s *Store) lock(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return broker.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		s.mu.Unlock()
		return err
	}
	return nil
}

// GroupID returns the store's group id, created by the first call.
func (s *Store) GroupID(ctx context.Context) (string, error) {
	if err := s.lock(ctx); err != nil {
		return "", err
	}
	defer s.mu.Unlock()
	if s.groupID == "" {
		s.groupID = broker.NewGroupID()
	}
	return s.groupID, nil
}

// PutIntent records an intent, replacing any of the same id.
func (s *Store) PutIntent(ctx context.Context, in broker.Intent) error {
	if err := broker.CheckLeaseID(in.LeaseID); err != nil {
		return err
	}
	created, err := broker.StorableTime(in.CreateTime)
	if err != nil {
		return fmt.Errorf("intent %q: %w", in.LeaseID, err)
	}
	in.CreateTime = created
	if err := s.lock(ctx); err != nil {
		return err
	}
	defer s.mu.Unlock()
	s.intents[in.LeaseID] = in
	return nil
}

// DeleteIntent removes an intent; a missing intent is not an error.
func (s *Store) DeleteIntent(ctx context.Context, leaseID string) error {
	if err := s.lock(ctx); err != nil {
		return err
	}
	defer s.mu.Unlock()
	delete(s.intents, leaseID)
	return nil
}

// ListIntents returns every intent in lease id order.
func (s *Store) ListIntents(ctx context.Context) ([]broker.Intent, error) {
	if err := s.lock(ctx); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	var out []broker.Intent
	for _, id := range sortedKeys(s.intents) {
		out = append(out, s.intents[id])
	}
	return out, nil
}

// CreateLease stores a new lease with revision 1 and deletes the intent of
// the same id at once; it moves the role's last issue time forward.
func (s *Store) CreateLease(ctx context.Context, l *broker.Lease) error {
	if l == nil {
		return fmt.Errorf("%w: nil lease", broker.ErrInvalidArgument)
	}
	rec := *l
	rec.Revision = 1
	stored, err := normalize(rec)
	if err != nil {
		return err
	}
	if err := s.lock(ctx); err != nil {
		return err
	}
	defer s.mu.Unlock()
	if _, ok := s.leases[rec.ID]; ok {
		return fmt.Errorf("lease %q: %w", rec.ID, broker.ErrExists)
	}
	s.leases[rec.ID] = stored
	if stored.Role != "" && !stored.IssueTime.IsZero() {
		if old, ok := s.lastIssued[stored.Role]; !ok || stored.IssueTime.After(old) {
			s.lastIssued[stored.Role] = stored.IssueTime
		}
	}
	delete(s.intents, rec.ID)
	l.Revision = rec.Revision
	return nil
}

// UpdateLease replaces the stored lease if its revision is still
// l.Revision, and returns the lease as a later GetLease would.
func (s *Store) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	l.Revision++
	stored, err := normalize(l)
	if err != nil {
		return broker.Lease{}, err
	}
	if err := s.lock(ctx); err != nil {
		return broker.Lease{}, err
	}
	defer s.mu.Unlock()
	if err := s.compareAndSet(stored); err != nil {
		return broker.Lease{}, err
	}
	return stored.Clone(), nil
}

// UpdateLeases is UpdateLease for many leases at once, with a result per
// lease: a missing, conflicting or invalid lease fails only its own entry;
// a closed store or a done context fails them all. A lease named twice
// succeeds at most once, since the first write moves its revision.
func (s *Store) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	out := make([]broker.Lease, len(ls))
	errs := make([]error, len(ls))
	for i, l := range ls {
		l.Revision++
		out[i], errs[i] = normalize(l)
	}
	if err := s.lock(ctx); err != nil {
		for i := range errs {
			if errs[i] == nil {
				errs[i] = err
			}
		}
	} else {
		for i := range out {
			if errs[i] == nil {
				errs[i] = s.compareAndSet(out[i])
			}
		}
		s.mu.Unlock()
	}
	for i := range out {
		if errs[i] != nil {
			out[i] = broker.Lease{}
		} else {
			out[i] = out[i].Clone()
		}
	}
	return out, errs
}

// compareAndSet stores l (already normalised, its revision moved on) if
// the stored lease's revision is the one before. s.mu is held.
func (s *Store) compareAndSet(l broker.Lease) error {
	old, ok := s.leases[l.ID]
	if !ok {
		return fmt.Errorf("lease %q: %w", l.ID, broker.ErrLeaseNotFound)
	}
	if base := l.Revision - 1; old.Revision != base {
		return fmt.Errorf("lease %q: stored revision is %d, update was based on %d: %w",
			l.ID, old.Revision, base, broker.ErrConflict)
	}
	s.leases[l.ID] = l
	return nil
}

// GetLease returns the lease with that id, or broker.ErrLeaseNotFound.
func (s *Store) GetLease(ctx context.Context, id string) (broker.Lease, error) {
	if err := s.lock(ctx); err != nil {
		return broker.Lease{}, err
	}
	defer s.mu.Unlock()
	l, ok := s.leases[id]
	if !ok {
		return broker.Lease{}, fmt.Errorf("lease %q: %w", id, broker.ErrLeaseNotFound)
	}
	return l.Clone(), nil
}

// DeleteLease removes a lease; a missing lease is not an error.
func (s *Store) DeleteLease(ctx context.Context, id string) error {
	if err := s.lock(ctx); err != nil {
		return err
	}
	defer s.mu.Unlock()
	delete(s.leases, id)
	return nil
}

// ListLeases returns the leases matching f in ascending (bytewise) id
// order. When f.Limit leases were returned and more match, the second
// result is the id of the last one, to pass as f.After; otherwise "".
func (s *Store) ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error) {
	if f.Limit < 0 {
		return nil, "", fmt.Errorf("%w: negative list limit %d", broker.ErrInvalidArgument, f.Limit)
	}
	if err := s.lock(ctx); err != nil {
		return nil, "", err
	}
	defer s.mu.Unlock()
	var out []broker.Lease
	for _, id := range sortedKeys(s.leases) {
		if f.After != "" && id <= f.After {
			continue
		}
		l := s.leases[id]
		if !f.Match(&l) {
			continue
		}
		if f.Limit > 0 && len(out) == f.Limit {
			return out, out[len(out)-1].ID, nil
		}
		out = append(out, l.Clone())
	}
	return out, "", nil
}

// ScanExpiry calls fn for each live lease in ascending order of the
// instant it needs attention (its ExpireTime, or its EndTime when set and
// earlier; ties in id order) until fn returns false. fn sees a snapshot
// taken before the first call and may call the store.
func (s *Store) ScanExpiry(ctx context.Context, fn func(broker.ExpiryEntry) bool) error {
	if err := s.lock(ctx); err != nil {
		return err
	}
	var entries []broker.ExpiryEntry
	for id, l := range s.leases {
		if !l.State.Live() {
			continue
		}
		due := l.ExpireTime
		if !l.EndTime.IsZero() && l.EndTime.Before(due) {
			due = l.EndTime
		}
		entries = append(entries, broker.ExpiryEntry{
			Expire:             due,
			LeaseID:            id,
			State:              l.State,
			Target:             l.Target,
			Username:           l.Username,
			RevokeOnDisconnect: l.RevokeOnDisconnect,
		})
	}
	s.mu.Unlock()
	sort.Slice(entries, func(i, j int) bool {
		if c := entries[i].Expire.Compare(entries[j].Expire); c != 0 {
			return c < 0
		}
		return entries[i].LeaseID < entries[j].LeaseID
	})
	for i, e := range entries {
		if (i+1)%ctxCheckEvery == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if !fn(e) {
			return nil
		}
	}
	return nil
}

// PurgeTombstones deletes up to limit terminal leases that ended before
// endedBefore, oldest first (ties in id order), and returns how many it
// deleted. limit must be positive. Roles' last issue times are kept.
func (s *Store) PurgeTombstones(ctx context.Context, endedBefore time.Time, limit int) (int, error) {
	if limit <= 0 {
		return 0, fmt.Errorf("%w: purge limit must be positive, got %d", broker.ErrInvalidArgument, limit)
	}
	cutoff := broker.PurgeCutoff(endedBefore)
	if err := s.lock(ctx); err != nil {
		return 0, err
	}
	defer s.mu.Unlock()
	type tomb struct {
		end int64
		id  string
	}
	var tombs []tomb
	for id, l := range s.leases {
		if l.State.Terminal() {
			if end := l.EndTime.UnixNano(); end < cutoff {
				tombs = append(tombs, tomb{end, id})
			}
		}
	}
	sort.Slice(tombs, func(i, j int) bool {
		if tombs[i].end != tombs[j].end {
			return tombs[i].end < tombs[j].end
		}
		return tombs[i].id < tombs[j].id
	})
	n := min(limit, len(tombs))
	for _, tb := range tombs[:n] {
		delete(s.leases, tb.id)
	}
	return n, nil
}

// LastIssued returns, for each broker role that ever had a lease in this
// store, the issue time of the newest one, whether that lease is still
// stored, a tombstone or already purged. A role with no lease is absent.
func (s *Store) LastIssued(ctx context.Context) (map[string]time.Time, error) {
	if err := s.lock(ctx); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	out := make(map[string]time.Time, len(s.lastIssued))
	for role, t := range s.lastIssued {
		out[role] = t
	}
	return out, nil
}

// normalize validates l as the bbolt store does before writing it, and
// returns it as a read would give it back: times in UTC with no monotonic
// reading, no empty metadata map, nothing shared with the caller.
func normalize(l broker.Lease) (broker.Lease, error) {
	if err := broker.CheckStorable(&l); err != nil {
		return broker.Lease{}, err
	}
	for _, t := range []*time.Time{&l.IssueTime, &l.ExpireTime, &l.MaxExpireTime, &l.NextAttempt, &l.EndTime} {
		*t, _ = broker.StorableTime(*t) // checked above
	}
	if len(l.Metadata) == 0 {
		l.Metadata = nil
	}
	return l.Clone(), nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
