package privcheck

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store"
)

// countingStore is the store with its ListLeases calls counted; it still
// offers LastIssued.
type countingStore struct {
	*store.Store
	lists int
}

func (c *countingStore) ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error) {
	c.lists++
	return c.Store.ListLeases(ctx, f)
}

// listOnly offers ListLeases alone, as a running broker does over gRPC
// (brokerctl check while brokerd holds the store).
type listOnly struct {
	LeaseLister
	lists int
}

func (l *listOnly) ListLeases(ctx context.Context, f broker.LeaseFilter) ([]broker.Lease, string, error) {
	l.lists++
	return l.LeaseLister.ListLeases(ctx, f)
}

// TestStaleCheck runs the stale check over a real store: through its
// LastIssued, without listing a lease, and through ListLeases alone. The
// two agree while the store holds every lease; after the tombstone purge
// only LastIssued still knows when a role last issued.
func TestStaleCheck(t *testing.T) {
	ctx := t.Context()
	now := time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	st, err := store.Open(filepath.Join(t.TempDir(), "leases.db"), store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	lease := func(id, role string, issued time.Time, ended bool) *broker.Lease {
		l := &broker.Lease{
			ID: id, Role: role, Client: "svc", Target: "main", Username: "cb_" + id, ProxyRole: role + "_proxy",
			IssueTime: issued, ExpireTime: issued.Add(time.Hour), MaxExpireTime: issued.Add(time.Hour),
			State: broker.StateActive,
		}
		if ended {
			l.State, l.EndTime = broker.StateExpired, issued.Add(time.Hour)
		}
		return l
	}
	for _, l := range []*broker.Lease{
		lease("old1", "old", now.Add(-50*day), true),
		lease("old2", "old", now.Add(-40*day), true),
		lease("busy1", "busy", now.Add(-time.Hour), false),
	} {
		if err := st.CreateLease(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	// The store's retention, broker.DefaultTombstoneRetention, is shorter
	// than DefaultStaleAfter.
	roles := []broker.Role{
		{Name: "old", Target: "main"},
		{Name: "busy", Target: "main"},
		{Name: "never", Target: "main"},
	}
	lastIssuedOld := "low: broker role last issued a lease 40 days ago (2030-04-22T12:00:00Z)"
	neverIssued := "info: broker role issued no lease the store remembers (ended leases are kept 1 day; " +
		"set store.tombstone_retention to at least 30 days to judge staleness)"

	check := func(t *testing.T, leases LeaseLister) map[string]string {
		t.Helper()
		fs, err := Run(ctx, Scope{Roles: roles}, Options{Leases: leases, Now: now, Retention: broker.DefaultTombstoneRetention})
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, f := range fs {
			if f.Check != CheckStale || f.Target != "main" {
				t.Errorf("unexpected finding %+v", f)
			}
			got[f.Role] = f.Severity.String() + ": " + f.Message
		}
		return got
	}
	tests := []struct {
		name      string
		purge     bool
		listOnly  bool
		want      map[string]string
		wantLists bool
	}{
		{"store", false, false, map[string]string{"old": lastIssuedOld, "never": neverIssued}, false},
		{"ListLeases only", false, true, map[string]string{"old": lastIssuedOld, "never": neverIssued}, true},
		// The purge drops old's tombstones: its last issue is still known
		// to the store, where paging through the leases finds none.
		{"store after purge", true, false, map[string]string{"old": lastIssuedOld, "never": neverIssued}, false},
		{"ListLeases only after purge", true, true, map[string]string{"old": neverIssued, "never": neverIssued}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.purge {
				if _, err := st.PurgeTombstones(ctx, now.Add(-broker.DefaultTombstoneRetention), 100); err != nil {
					t.Fatal(err)
				}
			}
			var got map[string]string
			var lists int
			if tt.listOnly {
				l := &listOnly{LeaseLister: st}
				got, lists = check(t, l), l.lists
			} else {
				c := &countingStore{Store: st}
				got, lists = check(t, c), c.lists
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("stale findings\n got %q\nwant %q", got, tt.want)
			}
			if (lists > 0) != tt.wantLists {
				t.Errorf("%d ListLeases calls, want some: %v", lists, tt.wantLists)
			}
		})
	}
}
