package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/credbroker/credbroker/broker"
)

// deleteUsers drops many users with DeleteUser's sequence, each step once
// for all of them: one query checks that every user is the broker's, one
// transaction blocks all their logins (committed before any session is
// ended), one query ends their sessions and reads what they own
// (pg_shdepend), one transaction reassigns and drops what they own where
// they own something, and drops them. A mass expiry or a burst of admin
// revocations then costs two commits per batch instead of two per user.
//
// errs[i] is the result of reqs[i]; a user that does not exist is success.
// A user that owns objects or holds privileges in another database goes
// through DeleteUser on its own after the batch (with its logins already
// blocked). Whatever else the batch does not handle plainly (a role the
// broker did not make, no usable proxy role, a statement that fails, DROP
// ROLE finding objects the catalog did not list) sends every user of the
// batch through DeleteUser one by one: its steps are idempotent, so
// starting again is safe, and it gives each user its own precise result.
func (e *engine) deleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	errs, todo := validBatch(e, reqs, validDeletion)
	for _, i := range todo {
		e.managed.forget(reqs[i].Username)
	}
	if len(todo) > 1 {
		alone, err := e.dropBatch(ctx, reqs, todo)
		if err == nil {
			e.log.Debug("dropped users", "count", len(todo)-len(alone))
			for _, i := range todo {
				if alone[reqs[i].Username] {
					errs[i] = e.deleteUser(ctx, reqs[i])
				}
			}
			return errs
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("postgres: dropping %d users: %w", len(todo), err)
			for _, i := range todo {
				errs[i] = err
			}
			return errs
		}
		e.log.Debug("dropping users one by one", "count", len(todo), "reason", e.sanitize(ctx, err))
	}
	for _, i := range todo {
		errs[i] = e.deleteUser(ctx, reqs[i])
	}
	return errs
}

// errOneByOne tells deleteUsers to take the one-user path.
var errOneByOne = errors.New("batch not applicable")

// dropBatch drops the users of reqs[todo] but those it returns, which
// deleteUsers drops one by one.
func (e *engine) dropBatch(ctx context.Context, reqs []broker.DeleteUserRequest, todo []int) (alone map[string]bool, err error) {
	names := make([]string, 0, len(todo))
	for _, i := range todo {
		if reqs[i].ProxyRole == "" {
			return nil, fmt.Errorf("%w: user %q has no proxy role", errOneByOne, reqs[i].Username)
		}
		names = append(names, reqs[i].Username)
	}

	// 1. Which users exist, and are they all the broker's (requireManaged)?
	present, err := e.managedStatus(ctx, names)
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		if managed, exists := present[name]; exists && !managed {
			return nil, fmt.Errorf("%w: role %q is not plainly the broker's", errOneByOne, name)
		}
	}
	proxyOf := map[string]string{}
	var users, proxies []string
	for _, i := range todo {
		u, p := reqs[i].Username, reqs[i].ProxyRole
		if _, seen := proxyOf[u]; present[u] && !seen {
			if !slices.Contains(proxies, p) {
				proxies = append(proxies, p)
			}
			proxyOf[u] = p
			users = append(users, u)
		}
	}
	if len(users) == 0 {
		return nil, nil // all gone already
	}

	// 2. Block every login and grant the users to the admin (see
	// DeleteUser), committed before any session is ended.
	var b strings.Builder
	for _, u := range users {
		b.WriteString(BlockLoginsSQL(u, e.admin) + "; ")
	}
	if _, err := e.pool.Exec(ctx, b.String()); err != nil {
		return nil, err
	}

	// 3. End their sessions, and read what they own.
	owned, err := e.endSessions(ctx, users, proxies)
	if err != nil {
		return nil, err
	}

	// 4. Objects in other databases need DeleteUser's per-database
	// handling; REASSIGN OWNED here needs proxy roles the admin can use.
	alone = map[string]bool{}
	disown := map[string][]string{} // by proxy role
	var dropped []string
	for _, u := range users {
		switch {
		case len(owned.elsewhere[u]) > 0:
			alone[u] = true
		case !owned.here[u]:
			dropped = append(dropped, u)
		case owned.usableProxies != len(proxies):
			alone[u] = true
		default:
			disown[proxyOf[u]] = append(disown[proxyOf[u]], u)
			dropped = append(dropped, u)
		}
	}
	if len(dropped) == 0 {
		return alone, nil
	}

	// 5. Reassign and drop what they own here, where they own anything,
	// and drop them, in one transaction.
	b.Reset()
	for _, p := range proxies {
		if len(disown[p]) > 0 {
			b.WriteString(DisownSQL(disown[p], p) + "; ")
		}
	}
	b.WriteString(DropUsersSQL(dropped...))
	if _, err := e.pool.Exec(ctx, b.String()); err != nil {
		return nil, err
	}
	return alone, nil
}
