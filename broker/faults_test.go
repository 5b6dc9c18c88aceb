package broker_test

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// errCrashed is what every call returns once a crashPoint has fired: the
// broker is as good as killed, and nothing it tries afterwards (not even its
// cleanup) reaches PostgreSQL or the store.
var errCrashed = errors.New("injected crash")

// crashSwitch is shared by a faultStore and a faultDB. When the named step
// is reached, the switch trips and every later call of either fails.
type crashSwitch struct {
	mu      sync.Mutex
	at      string // step name that trips the switch, "" = never
	tripped bool
	// failNext makes the next n calls of a step fail with err (without
	// tripping the switch): transient faults.
	failStep string
	failN    int
	failErr  error
}

func (c *crashSwitch) crashAt(step string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.at = step
}

func (c *crashSwitch) failNextCalls(step string, n int, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failStep, c.failN, c.failErr = step, n, err
}

// before is called before a step runs; after, once it ran successfully.
func (c *crashSwitch) before(step string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tripped {
		return errCrashed
	}
	if c.failStep == step && c.failN > 0 {
		c.failN--
		return c.failErr
	}
	if c.at == "before "+step {
		c.tripped = true
		return errCrashed
	}
	return nil
}

func (c *crashSwitch) after(step string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.at == "after "+step {
		c.tripped = true
		return errCrashed
	}
	return nil
}

func (c *crashSwitch) isTripped() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tripped
}

// faultStore wraps the real store.
type faultStore struct {
	broker.LeaseStore
	sw *crashSwitch
}

func (s faultStore) run(step string, f func() error) error {
	if err := s.sw.before(step); err != nil {
		return err
	}
	if err := f(); err != nil {
		return err
	}
	return s.sw.after(step)
}

func (s faultStore) PutIntent(ctx context.Context, in broker.Intent) error {
	return s.run("PutIntent", func() error { return s.LeaseStore.PutIntent(ctx, in) })
}
func (s faultStore) DeleteIntent(ctx context.Context, id string) error {
	return s.run("DeleteIntent", func() error { return s.LeaseStore.DeleteIntent(ctx, id) })
}
func (s faultStore) CreateLease(ctx context.Context, l *broker.Lease) error {
	return s.run("CreateLease", func() error { return s.LeaseStore.CreateLease(ctx, l) })
}
func (s faultStore) UpdateLease(ctx context.Context, l broker.Lease) (broker.Lease, error) {
	var out broker.Lease
	err := s.run("UpdateLease:"+l.State.String(), func() (err error) {
		out, err = s.LeaseStore.UpdateLease(ctx, l)
		return err
	})
	return out, err
}
func (s faultStore) UpdateLeases(ctx context.Context, ls []broker.Lease) ([]broker.Lease, []error) {
	// The same steps as UpdateLease, so a fault aimed at a renewal's write
	// hits it on the batch path too; a fault fails the whole batch.
	for _, l := range ls {
		if err := s.sw.before("UpdateLease:" + l.State.String()); err != nil {
			return make([]broker.Lease, len(ls)), repeatErr(err, len(ls))
		}
	}
	out, errs := s.LeaseStore.UpdateLeases(ctx, ls)
	for _, l := range ls {
		if err := s.sw.after("UpdateLease:" + l.State.String()); err != nil {
			return out, repeatErr(err, len(ls))
		}
	}
	return out, errs
}

func repeatErr(err error, n int) []error {
	errs := make([]error, n)
	for i := range errs {
		errs[i] = err
	}
	return errs
}

func (s faultStore) GetLease(ctx context.Context, id string) (broker.Lease, error) {
	if err := s.sw.before("GetLease"); err != nil {
		return broker.Lease{}, err
	}
	return s.LeaseStore.GetLease(ctx, id)
}

// faultDB wraps the real engine.
type faultDB struct {
	broker.Database
	sw *crashSwitch
	mu sync.Mutex
	// deleted records DeleteUser calls that succeeded.
	deleted []string
	// passwords records every password NewUser was asked to set, so tests
	// can look for them where they must not be, also for failed issues.
	passwords []string
}

func (d *faultDB) run(step string, f func() error) error {
	if err := d.sw.before(step); err != nil {
		return err
	}
	if err := f(); err != nil {
		return err
	}
	return d.sw.after(step)
}

func (d *faultDB) NewUser(ctx context.Context, req broker.NewUserRequest) error {
	d.mu.Lock()
	d.passwords = append(d.passwords, req.Password)
	d.mu.Unlock()
	return d.run("NewUser", func() error { return d.Database.NewUser(ctx, req) })
}

// HashPassword forwards to the engine, so that issues through faultDB
// take the broker's hash-ahead paths as they do in production.
func (d *faultDB) HashPassword(password string) (string, error) {
	return d.Database.(broker.PasswordHasher).HashPassword(password)
}

func (d *faultDB) RenewUser(ctx context.Context, req broker.RenewUserRequest) error {
	return d.run("RenewUser", func() error { return d.Database.RenewUser(ctx, req) })
}
func (d *faultDB) RenewUsers(ctx context.Context, reqs []broker.RenewUserRequest) []error {
	var errs []error
	if err := d.run("RenewUser", func() error {
		errs = d.Database.RenewUsers(ctx, reqs)
		return nil
	}); err != nil {
		return repeatErr(err, len(reqs))
	}
	return errs
}
func (d *faultDB) DeleteUser(ctx context.Context, req broker.DeleteUserRequest) error {
	return d.run("DeleteUser", func() error {
		if err := d.Database.DeleteUser(ctx, req); err != nil {
			return err
		}
		d.mu.Lock()
		d.deleted = append(d.deleted, req.Username)
		d.mu.Unlock()
		return nil
	})
}
func (d *faultDB) ListManagedUsers(ctx context.Context) ([]string, error) {
	var out []string
	err := d.run("ListManagedUsers", func() (err error) {
		out, err = d.Database.ListManagedUsers(ctx)
		return err
	})
	return out, err
}

// Close is a no-op: the test owns the real engine's lifetime.
func (d *faultDB) Close() {}

var _ = time.Second
