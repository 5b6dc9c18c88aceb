package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/credbroker/credbroker/broker"
)

// deleteUsers drops many users with DeleteUser's sequence, each step once
// for all of them: one query checks that every user is the broker's, one
// transaction blocks all their logins (committed before any session is
// ended), one query ends their sessions, one transaction reassigns and
// drops what they own and drops them. A mass expiry then costs two commits
// per batch instead of two per user.
//
// errs[i] is the result of reqs[i]; a user that does not exist is success.
// Whatever the batch does not handle plainly (a role the broker did not
// make, objects in another database, no usable proxy role, a statement
// that fails) sends every user of the batch through DeleteUser one by one:
// its steps are idempotent, so starting again is safe, and it gives each
// user its own precise result.
func (e *engine) deleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	errs, todo := validBatch(e, reqs, validDeletion)
	for _, i := range todo {
		e.managed.forget(reqs[i].Username)
	}
	if len(todo) > 1 {
		err := e.dropBatch(ctx, reqs, todo)
		if err == nil {
			e.log.Debug("dropped users", "count", len(todo))
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

func (e *engine) dropBatch(ctx context.Context, reqs []broker.DeleteUserRequest, todo []int) error {
	names := make([]string, 0, len(todo))
	for _, i := range todo {
		if reqs[i].ProxyRole == "" {
			return fmt.Errorf("%w: user %q has no proxy role", errOneByOne, reqs[i].Username)
		}
		names = append(names, reqs[i].Username)
	}

	// 1. Which users exist, and are they all the broker's (requireManaged)?
	present, err := e.managedStatus(ctx, names)
	if err != nil {
		return err
	}
	for _, name := range names {
		if managed, exists := present[name]; exists && !managed {
			return fmt.Errorf("%w: role %q is not plainly the broker's", errOneByOne, name)
		}
	}
	byProxy := map[string][]string{}
	var users []string
	for _, i := range todo {
		if u := reqs[i].Username; present[u] {
			byProxy[reqs[i].ProxyRole] = append(byProxy[reqs[i].ProxyRole], u)
			users = append(users, u)
		}
	}
	if len(users) == 0 {
		return nil // all gone already
	}

	// 2. Block every login and grant the users to the admin (see
	// DeleteUser), committed before any session is ended.
	var b strings.Builder
	for _, u := range users {
		b.WriteString(blockAndGrantSQL(u, e.admin) + "; ")
	}
	if _, err := e.pool.Exec(ctx, b.String()); err != nil {
		return err
	}

	// 3. End their sessions.
	if err := e.endSessions(ctx, users); err != nil {
		return err
	}

	// 4. Objects in other databases, or a proxy role the admin cannot
	// reassign to, need DeleteUser's per-user handling.
	proxies := make([]string, 0, len(byProxy))
	for p := range byProxy {
		proxies = append(proxies, p)
	}
	var elsewhere, usable int
	if err := e.pool.QueryRow(ctx, batchDropQuery, users, proxies).Scan(&elsewhere, &usable); err != nil {
		return err
	}
	if elsewhere > 0 {
		return fmt.Errorf("%w: users own objects in other databases", errOneByOne)
	}
	if usable != len(proxies) {
		return fmt.Errorf("%w: a proxy role is missing or not usable by the admin", errOneByOne)
	}

	// 5. Reassign, drop what they own, and drop them, in one transaction.
	b.Reset()
	all := make([]string, 0, len(users))
	for _, p := range proxies {
		b.WriteString(disownSQL(byProxy[p], p) + "; ")
		all = append(all, byProxy[p]...)
	}
	b.WriteString(DropUsersSQL(all...))
	_, err = e.pool.Exec(ctx, b.String())
	return err
}
