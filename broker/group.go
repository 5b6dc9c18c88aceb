package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// groupState is what a broker knows of its broker group: the group's id
// (LeaseStore.GroupID, read once) and which targets' marker roles it has
// claimed (MarkerClaimer). A target is claimed before the broker issues
// into it or sweeps its marker role: a user created under a marker role
// another group owns would be dropped by that group, and a sweep of such
// a role would drop that group's users.
type groupState struct {
	mu      sync.Mutex
	id      string
	claimed map[string]bool // by target
}

// groupID returns the group's id, reading it from the store on first use.
func (b *Broker) groupID(ctx context.Context) (string, error) {
	b.group.mu.Lock()
	defer b.group.mu.Unlock()
	if b.group.id != "" {
		return b.group.id, nil
	}
	id, err := b.store.GroupID(ctx)
	if err != nil {
		return "", fmt.Errorf("broker group id: %w", err)
	}
	b.group.id = id
	return id, nil
}

// claimMarker claims the target's marker role for the group, or checks
// the claim (every time: Reconcile calls it before each sweep, so a claim
// taken away meanwhile stops the sweep). A Database that is no
// MarkerClaimer is taken as claimed.
func (b *Broker) claimMarker(ctx context.Context, target string) error {
	db, err := b.db(target)
	if err != nil {
		return err
	}
	c, ok := db.(MarkerClaimer)
	if ok {
		var group string
		if group, err = b.groupID(ctx); err == nil {
			err = c.ClaimMarker(ctx, group)
		}
	}
	b.group.mu.Lock()
	if b.group.claimed == nil {
		b.group.claimed = make(map[string]bool)
	}
	b.group.claimed[target] = err == nil
	b.group.mu.Unlock()
	if err != nil {
		return fmt.Errorf("target %s: %w", target, err)
	}
	return nil
}

// ensureClaimed is claimMarker for the issue path: one map read once the
// target is claimed. A target down at start-up is claimed by the first
// issue after it is back.
func (b *Broker) ensureClaimed(ctx context.Context, target string) error {
	b.group.mu.Lock()
	done := b.group.claimed[target]
	b.group.mu.Unlock()
	if done {
		return nil
	}
	return b.claimMarker(ctx, target)
}

// claimAll claims every target's marker role at start-up. A role another
// group owns is an error: the broker must not start, or its first sweep
// would drop the other group's users. A target that cannot be reached is
// left unclaimed (it is neither issued into nor swept until claimed), so
// the others are served.
func (b *Broker) claimAll(ctx context.Context) error {
	var owned []error
	for target := range b.dbs {
		err := b.claimMarker(ctx, target)
		switch {
		case err == nil:
		case errors.Is(err, ErrMarkerOwned):
			owned = append(owned, err)
		default:
			b.log.Warn("could not claim the marker role of a target; it is not served until it is claimed",
				"target", target, "err", err)
		}
	}
	return errors.Join(owned...)
}

// foreignIntent reports an intent another broker group wrote (see
// Intent.Group): the reconciler leaves its user alone.
func (b *Broker) foreignIntent(in Intent) bool {
	b.group.mu.Lock()
	defer b.group.mu.Unlock()
	return in.Group != "" && b.group.id != "" && in.Group != b.group.id
}
