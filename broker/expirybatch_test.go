package broker_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// batchDB exposes the real engine's DeleteUsers (faultDB hides it) and
// counts the calls, to show that the batch path ran.
type batchDB struct {
	broker.Database
	deleter broker.UsersDeleter
	calls   atomic.Int32
}

func (d *batchDB) DeleteUsers(ctx context.Context, reqs []broker.DeleteUserRequest) []error {
	d.calls.Add(1)
	return d.deleter.DeleteUsers(ctx, reqs)
}

// TestExpiryBurstRevokesInBatches expires many leases at the same instant,
// one of them with an open session: the expiry manager drops them through
// DeleteUsers, every lease ends EXPIRED, every user is gone and the
// session is ended.
func TestExpiryBurstRevokesInBatches(t *testing.T) {
	var db *batchDB
	e := newEnv(t, func(c *broker.Config) {
		inner := c.Databases["main"]
		db = &batchDB{Database: inner, deleter: inner.(*faultDB).Database.(broker.UsersDeleter)}
		c.Databases = map[string]broker.Database{"main": db}
		c.RevokeRate = 1000
	})
	const n = 24
	leases := make([]broker.Lease, n)
	creds := make([]broker.Credential, n)
	for i := range n {
		leases[i], creds[i] = e.issue(roleRO, time.Minute)
	}
	conn, err := e.login(creds[0])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())

	e.clock.Advance(time.Minute)
	for i := range n {
		l := e.waitState(leases[i].ID, broker.StateExpired)
		if l.EndTime.IsZero() || l.LastError != "" {
			t.Errorf("lease %s: end %v, last error %q", l.ID, l.EndTime, l.LastError)
		}
		if e.roleExists(creds[i].Username) {
			t.Errorf("user %s still exists", creds[i].Username)
		}
	}
	if db.calls.Load() == 0 {
		t.Error("the expiry manager never used DeleteUsers")
	}
	if err := conn.Ping(context.Background()); err == nil {
		t.Error("the session of an expired user survived")
	}
}
