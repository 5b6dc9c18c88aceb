package daemon

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// brokerd's lease clock. Every lease time (issue, expire, renew) and every
// expiry decision is an instant on one clock, and brokers of a group
// compare instants that different hosts computed. If that clock were the
// host's wall clock, a step of one host's clock (an operator's date
// command, a broken NTP source, a VM restored from a snapshot) would move
// the lease times it writes: two minutes back, and the leases it issues
// expire two minutes early on the leader, however right the leader's own
// clock is. So brokerd keeps its lease clock on the targets' database
// clock, the one VALID UNTIL follows and every broker of a group shares:
// it reads it (SELECT statement_timestamp()) at start-up and every
// dbClockRefresh, and between two readings it advances by the host's
// monotonic clock, which a step of the wall clock does not move. A target
// that cannot be read leaves the last reading in force; before the first
// one, the host's clock is used. The expiry manager still checks the
// database's clock before it revokes (broker.Config.CheckDatabaseClock).

// dbClockRefresh is how often the lease clock is read again from the
// database: it follows the database's own clock (NTP slews it, a DBA may
// step it) to within the monotonic clock's drift over this long, which is
// microseconds.
const dbClockRefresh = 10 * time.Second

// dbClockMaxRTT bounds the round trip of a reading that is used: the
// reading's error is at most half of it.
const dbClockMaxRTT = 500 * time.Millisecond

// dbClockWarn is how far the host's clock may be from the database's
// before brokerd says so.
const dbClockWarn = time.Second

// anchoredClock is the lease clock: the database's time at the last
// reading plus the monotonic time since.
type anchoredClock struct {
	host   broker.Clock // before the first reading; its After always
	log    *slog.Logger
	mu     sync.Mutex
	dbAt   time.Time // the database's time at the reading (wall only)
	monoAt time.Time // time.Now() (with its monotonic reading) then
	off    bool      // the last warning said the clocks differ
}

func newAnchoredClock(host broker.Clock, log *slog.Logger) *anchoredClock {
	if host == nil {
		host = broker.SystemClock{}
	}
	return &anchoredClock{host: host, log: log}
}

// Now is the database's time as last read, advanced by the monotonic
// clock; the host's clock until the first reading.
func (c *anchoredClock) Now() time.Time {
	c.mu.Lock()
	dbAt, monoAt := c.dbAt, c.monoAt
	c.mu.Unlock()
	if dbAt.IsZero() {
		return c.host.Now()
	}
	return dbAt.Add(time.Since(monoAt))
}

// After waits on the host's timers: durations, which a step of the wall
// clock does not change.
func (c *anchoredClock) After(d time.Duration) <-chan time.Time { return c.host.After(d) }

// read reads the first of clocks that answers within dbClockMaxRTT and
// anchors the lease clock on it; it reports whether one did.
func (c *anchoredClock) read(ctx context.Context, clocks []broker.DatabaseClock) bool {
	for _, db := range clocks {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		t0 := time.Now()
		dbNow, err := db.Now(rctx)
		rtt := time.Since(t0)
		cancel()
		if err != nil || dbNow.IsZero() || rtt > dbClockMaxRTT {
			continue
		}
		mid := t0.Add(rtt / 2)
		host := c.host.Now()
		c.mu.Lock()
		c.dbAt, c.monoAt = dbNow.Round(0), mid
		ahead := host.Sub(dbNow.Add(time.Since(mid)))
		warn := ahead > dbClockWarn || ahead < -dbClockWarn
		changed := warn != c.off
		c.off = warn
		c.mu.Unlock()
		switch {
		case changed && warn:
			c.log.Warn("this host's clock differs from the database's: lease times follow the database's clock",
				"host_ahead_by", ahead.Round(time.Millisecond))
		case changed:
			c.log.Info("this host's clock agrees with the database's again")
		}
		return true
	}
	return false
}

// follow reads the clock every dbClockRefresh until ctx ends.
func (c *anchoredClock) follow(ctx context.Context, clocks []broker.DatabaseClock) {
	t := time.NewTicker(dbClockRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.read(ctx, clocks)
		}
	}
}

// databaseClocks lists the targets that can tell their time, by name.
func databaseClocks(dbs map[string]broker.Database) []broker.DatabaseClock {
	names := make([]string, 0, len(dbs))
	for name := range dbs {
		names = append(names, name)
	}
	slices.Sort(names)
	var out []broker.DatabaseClock
	for _, name := range names {
		if c, ok := dbs[name].(broker.DatabaseClock); ok {
			out = append(out, c)
		}
	}
	return out
}
