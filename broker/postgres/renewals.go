package postgres

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/credbroker/credbroker/broker"
)

// renewUsers moves the VALID UNTIL of many users in one transaction, in
// two round trips: one checks that every user exists and is the broker's
// (as RenewUser's requireManaged does, for all at once), and one
// multi-statement exec alters them all and commits. Users this engine
// created or checked before (see managedCache) skip the check: a batch of
// only those takes one round trip. errs[i] is the result of reqs[i]: a missing user is
// ErrUserNotFound for its own entry only, a role the broker did not make is
// refused, and an error of the transaction (the server is down) fails every
// entry still pending.
//
// A user dropped by someone else between the check and the ALTER aborts
// the transaction; then each user is renewed on its own, which is slow but
// gives every entry its true result.
func (e *engine) renewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	errs, todo := validBatch(e, reqs, validRenewal)
	if len(todo) == 0 {
		return errs
	}
	retryAlone, err := e.renewBatch(ctx, reqs, todo, errs)
	if err != nil {
		err = fmt.Errorf("postgres: renewing %d users: %w", len(todo), err)
		for _, i := range todo {
			if errs[i] == nil {
				errs[i] = err
			}
		}
		return errs
	}
	for _, i := range retryAlone {
		errs[i] = e.renewUser(ctx, reqs[i])
	}
	return errs
}

// renewBatch runs the batch transaction. It fills errs for users it
// refuses, and returns the indexes to renew one by one when the batch
// statement failed for a reason that may concern a single user.
func (e *engine) renewBatch(ctx context.Context, reqs []broker.RenewUserRequest, todo []int, errs []error) ([]int, error) {
	names := make([]string, 0, len(todo))
	for _, i := range todo {
		names = append(names, reqs[i].Username)
	}
	if e.managed.all(names) {
		var stmt strings.Builder
		for _, i := range todo {
			stmt.WriteString(RenewUserSQL(reqs[i].Username, reqs[i].ValidUntil) + "; ")
		}
		_, err := e.pool.Exec(ctx, stmt.String())
		if err == nil || ctx.Err() != nil || unavailable(err) {
			return nil, err
		}
		// A user is gone, or no longer what it was: check them all.
		e.managed.forget(names...)
	}
	managed, err := e.managedStatus(ctx, names)
	if err != nil {
		return nil, err
	}

	var stmt strings.Builder
	var altered []int
	for _, i := range todo {
		name := reqs[i].Username
		ok, exists := managed[name]
		switch {
		case !exists:
			errs[i] = fmt.Errorf("postgres: renewing user %q: %w", name, ErrUserNotFound)
		case !ok:
			errs[i] = e.notManaged(name)
		default:
			// Names are validated and quoted, instants formatted by us:
			// no bind parameters in ALTER ROLE, so one simple-protocol
			// exec runs them all.
			stmt.WriteString(RenewUserSQL(name, reqs[i].ValidUntil) + "; ")
			altered = append(altered, i)
		}
	}
	if len(altered) == 0 {
		return nil, nil
	}
	// Several statements in one simple-protocol query run as one implicit
	// transaction: all of them commit, or none. An explicit BEGIN around
	// the check would add two round trips and protect nothing: the check
	// takes no lock, so a user dropped in between fails the ALTER either way.
	if _, err := e.pool.Exec(ctx, stmt.String()); err != nil {
		if ctx.Err() != nil || unavailable(err) {
			return nil, err
		}
		return altered, nil
	}
	for _, i := range altered {
		e.managed.add(reqs[i].Username)
	}
	return nil, nil
}

// managedCache remembers the users this engine made or found to be plain
// members of the marker role, so that renewing them again skips the
// check: a renewal names the user its lease recorded when the engine
// created it, and a user made once by the broker stays the broker's. A
// user that is dropped, or fails to be altered, is forgotten and checked
// again. Dropping never trusts it: DeleteUser checks every time.
type managedCache struct {
	mu    sync.Mutex
	names map[string]struct{}
}

// maxManagedCache bounds the cache (about 100 bytes per name); past it the
// cache starts over, which only costs checks.
const maxManagedCache = 1 << 20

func (c *managedCache) add(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.names == nil || len(c.names) >= maxManagedCache {
		c.names = make(map[string]struct{})
	}
	c.names[name] = struct{}{}
}

func (c *managedCache) forget(names ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range names {
		delete(c.names, n)
	}
}

// all reports whether every name is known.
func (c *managedCache) all(names []string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range names {
		if _, ok := c.names[n]; !ok {
			return false
		}
	}
	return true
}
