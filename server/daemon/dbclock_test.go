package daemon

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

type fixedDBClock struct {
	t   time.Time
	err error
}

func (c fixedDBClock) Now(context.Context) (time.Time, error) { return c.t, c.err }

// TestAnchoredClockIgnoresHostSteps: before a reading the lease clock is
// the host's; after one it is the database's time plus the monotonic time
// since, whatever the host's wall clock does; a target that cannot tell
// its time is skipped for the next one.
func TestAnchoredClockIgnoresHostSteps(t *testing.T) {
	host := &steppedClock{}
	c := newAnchoredClock(host, slog.New(slog.DiscardHandler))
	host.Step(time.Hour)
	if d := time.Until(c.Now()); d < time.Hour-time.Second || d > time.Hour+time.Second {
		t.Fatalf("before a reading Now is %s from the real time, want the host's (+1h)", d)
	}
	dbT := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	down := fixedDBClock{err: errors.New("down")}
	if !c.read(context.Background(), []broker.DatabaseClock{down, fixedDBClock{t: dbT}}) {
		t.Fatal("no reading taken")
	}
	host.Step(-3 * time.Hour)
	before := time.Now()
	got := c.Now()
	if d := got.Sub(dbT); d < 0 || d > time.Since(before)+time.Second {
		t.Fatalf("after a reading Now = %s, want the database's %s plus the time since", got, dbT)
	}
	if c.read(context.Background(), []broker.DatabaseClock{down}) {
		t.Fatal("a failed reading was taken")
	}
	if d := c.Now().Sub(dbT); d < 0 || d > time.Minute {
		t.Fatalf("a failed reading moved the clock to %s", c.Now())
	}
}
