// Package fakedb is an in-memory broker.Database for tests of the broker's
// domain: it keeps the users it is asked to create, records every call, and
// can be made to fail (the next call of a method, every call naming one
// user, or everything, as when PostgreSQL is down).
//
// It is for tests only: it creates no PostgreSQL user, and it keeps the
// passwords it is given in memory so tests can compare them. What only
// PostgreSQL can show (sessions ended, owned objects reassigned, VALID
// UNTIL honoured, grants) is tested against a real cluster
// (broker/postgres, and broker's PostgreSQL-backed tests).
package fakedb

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// Method names, as Call.Method and FailNext take them.
const (
	NewUser          = "NewUser"
	RenewUser        = "RenewUser"
	RenewUsers       = "RenewUsers"
	DeleteUser       = "DeleteUser"
	DeleteUsers      = "DeleteUsers"
	ListManagedUsers = "ListManagedUsers"
	CheckProxyRole   = "CheckProxyRole"
	HashPassword     = "HashPassword"
)

// ErrUserExists is what NewUser returns for a name already taken, as
// CREATE ROLE refuses one.
var ErrUserExists = errors.New("fakedb: role already exists")

// User is a user the fake holds.
type User struct {
	Name       string
	ProxyRole  string
	ValidUntil time.Time
	// Password and Verifier are what NewUser was given (Verifier computed
	// by HashPassword when the request had none).
	Password string
	Verifier string
}

// Call is one call the fake received: the method and, for those that
// name users, the users in request order.
type Call struct {
	Method string
	Users  []string
}

// DB is a fake broker.Database. It also implements broker.PasswordHasher
// and broker.UsersDeleter, as the PostgreSQL engine does, so the broker
// takes its production paths. It is safe for concurrent use; the zero
// value is not usable, call New.
type DB struct {
	mu          sync.Mutex
	users       map[string]User
	calls       []Call
	nextErr     map[string][]error
	userErr     map[string]error
	unavailable bool
	proxyRoles  map[string]bool // nil: every proxy role checks out
	endpoint    broker.Endpoint
	closed      bool
	clock       func() time.Time // the server's clock; nil: Now answers the zero time
}

var (
	_ broker.Database       = (*DB)(nil)
	_ broker.PasswordHasher = (*DB)(nil)
	_ broker.UsersDeleter   = (*DB)(nil)
	_ broker.DatabaseClock  = (*DB)(nil)
)

// SetClock gives the fake server a clock of its own (broker.DatabaseClock).
// Without one, Now answers the zero time, which the broker takes as "no
// clock to check against".
func (d *DB) SetClock(now func() time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.clock = now
}

// Now is the fake server's clock. It is not recorded in Calls.
func (d *DB) Now(context.Context) (time.Time, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.unavailable {
		return time.Time{}, fmt.Errorf("%w: fakedb: connection refused", broker.ErrUnavailable)
	}
	if d.clock == nil {
		return time.Time{}, nil
	}
	return d.clock(), nil
}

// New returns a fake with no users, whose Endpoint is 127.0.0.1:5432/app.
func New() *DB {
	return &DB{
		users:    make(map[string]User),
		nextErr:  make(map[string][]error),
		userErr:  make(map[string]error),
		endpoint: broker.Endpoint{Host: "127.0.0.1", Port: 5432, Database: "app"},
	}
}

// FailNext makes the next call of method (one of the method constants)
// fail with err; called again, the errors queue up. For RenewUsers and
// DeleteUsers the whole call fails, as a failed transaction does.
func (d *DB) FailNext(method string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.nextErr[method] = append(d.nextErr[method], err)
}

// FailUser makes every call naming user fail with err, until called again
// with a nil err. In RenewUsers and DeleteUsers only that user's entry
// fails.
func (d *DB) FailUser(user string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err == nil {
		delete(d.userErr, user)
	} else {
		d.userErr[user] = err
	}
}

// SetUnavailable makes every call fail with an error wrapping
// broker.ErrUnavailable (down is true) or work again (false).
func (d *DB) SetUnavailable(down bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.unavailable = down
}

// SetProxyRoles makes CheckProxyRole accept only these proxy roles.
func (d *DB) SetProxyRoles(roles ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.proxyRoles = make(map[string]bool, len(roles))
	for _, r := range roles {
		d.proxyRoles[r] = true
	}
}

// AddUser creates a member of the marker role behind the broker's back, as
// a crash after CREATE ROLE or a lost store file leaves one.
func (d *DB) AddUser(u User) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.users[u.Name] = u
}

// DropUser drops a user behind the broker's back.
func (d *DB) DropUser(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.users, name)
}

// User returns the user of that name, if it exists.
func (d *DB) User(name string) (User, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	u, ok := d.users[name]
	return u, ok
}

// Usernames returns the names of the users that exist, sorted.
func (d *DB) Usernames() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sortedNames()
}

// Calls returns the calls received so far, oldest first.
func (d *DB) Calls() []Call {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]Call, len(d.calls))
	for i, c := range d.calls {
		out[i] = Call{Method: c.Method, Users: slices.Clone(c.Users)}
	}
	return out
}

// CallCount returns how many calls of method were received.
func (d *DB) CallCount(method string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, c := range d.calls {
		if c.Method == method {
			n++
		}
	}
	return n
}

// Closed reports whether Close was called.
func (d *DB) Closed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closed
}

// begin records a call and returns the error the whole call fails with,
// if any. d.mu is held.
func (d *DB) begin(method string, users ...string) error {
	d.calls = append(d.calls, Call{Method: method, Users: users})
	if d.unavailable {
		return fmt.Errorf("%w: fakedb: connection refused", broker.ErrUnavailable)
	}
	if errs := d.nextErr[method]; len(errs) > 0 {
		d.nextErr[method] = errs[1:]
		return errs[0]
	}
	return nil
}

// NewUser creates the user; a name that exists fails with ErrUserExists.
func (d *DB) NewUser(ctx context.Context, req broker.NewUserRequest) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.begin(NewUser, req.Username); err != nil {
		return err
	}
	if err := d.userErr[req.Username]; err != nil {
		return err
	}
	if _, ok := d.users[req.Username]; ok {
		return fmt.Errorf("user %s: %w", req.Username, ErrUserExists)
	}
	v := req.Verifier
	if v == "" {
		v = verifier(req.Password)
	}
	d.users[req.Username] = User{Name: req.Username, ProxyRole: req.ProxyRole, ValidUntil: req.ValidUntil, Password: req.Password, Verifier: v}
	return nil
}

// HashPassword returns a stand-in verifier (not SCRAM) of password.
func (d *DB) HashPassword(password string) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.begin(HashPassword); err != nil {
		return "", err
	}
	return verifier(password), nil
}

func verifier(password string) string {
	sum := sha256.Sum256([]byte(password))
	return "fake-verifier:" + hex.EncodeToString(sum[:])
}

// RenewUser moves the user's VALID UNTIL; a missing user fails with
// broker.ErrUserNotFound.
func (d *DB) RenewUser(ctx context.Context, req broker.RenewUserRequest) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.begin(RenewUser, req.Username); err != nil {
		return err
	}
	return d.renew(req)
}

// renew renews one user. d.mu is held.
func (d *DB) renew(req broker.RenewUserRequest) error {
	if err := d.userErr[req.Username]; err != nil {
		return err
	}
	u, ok := d.users[req.Username]
	if !ok {
		return fmt.Errorf("user %s: %w", req.Username, broker.ErrUserNotFound)
	}
	u.ValidUntil = req.ValidUntil
	d.users[req.Username] = u
	return nil
}

// RenewUsers is RenewUser for many users, with an error per request.
func (d *DB) RenewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	names := make([]string, len(reqs))
	for i, r := range reqs {
		names[i] = r.Username
	}
	return d.batch(ctx, RenewUsers, names, func(i int) error { return d.renew(reqs[i]) })
}

// batch runs a call naming many users, each as one, with an error per
// user: the whole call's error (context, unavailable, FailNext) fails
// every entry, as a failed transaction does.
func (d *DB) batch(ctx context.Context, method string, names []string, each func(i int) error) []error {
	errs := make([]error, len(names))
	d.mu.Lock()
	defer d.mu.Unlock()
	err := ctx.Err()
	if err == nil {
		err = d.begin(method, names...)
	}
	for i := range names {
		if err != nil {
			errs[i] = err
		} else {
			errs[i] = each(i)
		}
	}
	return errs
}

// DeleteUser drops the user; a user that does not exist is success.
func (d *DB) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.begin(DeleteUser, req.Username); err != nil {
		return err
	}
	return d.drop(req.Username)
}

// drop drops one user. d.mu is held.
func (d *DB) drop(name string) error {
	if err := d.userErr[name]; err != nil {
		return err
	}
	delete(d.users, name)
	return nil
}

// DeleteUsers is DeleteUser for many users, with an error per request.
func (d *DB) DeleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	names := make([]string, len(reqs))
	for i, r := range reqs {
		names[i] = r.Username
	}
	return d.batch(ctx, DeleteUsers, names, func(i int) error { return d.drop(names[i]) })
}

// ListManagedUsers lists the users, sorted.
func (d *DB) ListManagedUsers(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.begin(ListManagedUsers); err != nil {
		return nil, err
	}
	return d.sortedNames(), nil
}

func (d *DB) sortedNames() []string {
	names := make([]string, 0, len(d.users))
	for n := range d.users {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// CheckProxyRole accepts every proxy role, or those SetProxyRoles named.
func (d *DB) CheckProxyRole(ctx context.Context, proxyRole string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.begin(CheckProxyRole); err != nil {
		return err
	}
	if d.proxyRoles != nil && !d.proxyRoles[proxyRole] {
		return fmt.Errorf("fakedb: proxy role %q does not exist", proxyRole)
	}
	return nil
}

// Endpoint returns where issued users would connect.
func (d *DB) Endpoint() broker.Endpoint {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.endpoint
}

// Close marks the fake closed (see Closed); it keeps working, so a test
// can still look at it.
func (d *DB) Close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
}
