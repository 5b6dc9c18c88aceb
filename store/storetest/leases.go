package storetest

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

func testIntents(t *testing.T, open OpenFunc) {
	s := open(t)
	ctx := t.Context()
	intents := []broker.Intent{
		{LeaseID: "b", Target: "main", Username: "cb_ro_b", ProxyRole: "ro_role", CreateTime: at(0)},
		{LeaseID: "a", Target: "main", Username: "cb_ro_a", ProxyRole: "ro_role", CreateTime: at(time.Second)},
		{LeaseID: "c", Target: "other", Username: "cb_ro_c", ProxyRole: "ro_role"},
		{LeaseID: "d", Target: "main", Username: "cb_ro_d", ProxyRole: "ro_role", CreateTime: at(0), Group: "g2345"},
	}
	for _, in := range intents {
		if err := s.PutIntent(ctx, in); err != nil {
			t.Fatalf("PutIntent(%s): %v", in.LeaseID, err)
		}
	}
	list := func(t *testing.T) []broker.Intent {
		t.Helper()
		got, err := s.ListIntents(ctx)
		if err != nil {
			t.Fatalf("ListIntents: %v", err)
		}
		for i := range got {
			got[i].CreateTime = normalizeTime(got[i].CreateTime)
		}
		return got
	}

	t.Run("listed in lease id order", func(t *testing.T) {
		want := []broker.Intent{intents[1], intents[0], intents[2], intents[3]}
		if got := list(t); !reflect.DeepEqual(got, want) {
			t.Errorf("ListIntents = %+v, want %+v", got, want)
		}
	})
	t.Run("put replaces", func(t *testing.T) {
		intents[3].Username = "cb_ro_d2"
		if err := s.PutIntent(ctx, intents[3]); err != nil {
			t.Fatal(err)
		}
		want := []broker.Intent{intents[1], intents[0], intents[2], intents[3]}
		if got := list(t); !reflect.DeepEqual(got, want) {
			t.Errorf("ListIntents = %+v, want %+v", got, want)
		}
	})
	t.Run("without an id", func(t *testing.T) {
		if err := s.PutIntent(ctx, broker.Intent{Username: "cb_x"}); !errors.Is(err, broker.ErrInvalidArgument) {
			t.Errorf("PutIntent without id: %v, want ErrInvalidArgument", err)
		}
	})
	t.Run("CreateLease consumes its own intent only", func(t *testing.T) {
		MustCreate(t, s, NewLease("a", "ro", "svc", at(time.Minute)))
		want := []broker.Intent{intents[0], intents[2], intents[3]}
		if got := list(t); !reflect.DeepEqual(got, want) {
			t.Errorf("ListIntents = %+v, want %+v", got, want)
		}
	})
	t.Run("delete", func(t *testing.T) {
		for _, id := range []string{"c", "c", "never-existed"} {
			if err := s.DeleteIntent(ctx, id); err != nil {
				t.Errorf("DeleteIntent(%s): %v", id, err)
			}
		}
		want := []broker.Intent{intents[0], intents[3]}
		if got := list(t); !reflect.DeepEqual(got, want) {
			t.Errorf("ListIntents = %+v, want %+v", got, want)
		}
	})
	t.Run("DeleteLease leaves intents", func(t *testing.T) {
		if err := s.DeleteLease(ctx, "b"); err != nil {
			t.Fatal(err)
		}
		if got := list(t); len(got) != 2 {
			t.Errorf("ListIntents = %+v, want 2 intents", got)
		}
	})
}

func normalizeTime(tm time.Time) time.Time {
	if tm.IsZero() {
		return time.Time{}
	}
	return tm.UTC().Round(0)
}

// invalidLeases are leases every store refuses with ErrInvalidArgument:
// without a key, without an index key, or with a time an index key cannot
// hold.
var invalidLeases = []struct {
	name   string
	mutate func(l *broker.Lease)
}{
	{"empty id", func(l *broker.Lease) { l.ID = "" }},
	{"unspecified state", func(l *broker.Lease) { l.State = broker.StateUnspecified }},
	{"unknown state", func(l *broker.Lease) { l.State = broker.LeaseState(42) }},
	{"live without expire time", func(l *broker.Lease) { l.ExpireTime = time.Time{} }},
	{"terminal without end time", func(l *broker.Lease) { l.State = broker.StateExpired }},
	{"negative revoke attempts", func(l *broker.Lease) { l.RevokeAttempts = -1 }},
	{"time before 1970", func(l *broker.Lease) { l.IssueTime = time.Date(1969, 1, 1, 0, 0, 0, 0, time.UTC) }},
	{"year 1000 (UnixNano wraps positive)", func(l *broker.Lease) {
		l.State, l.EndTime = broker.StateRevoked, time.Date(1000, 1, 1, 0, 0, 0, 0, time.UTC)
	}},
	{"time after 2262", func(l *broker.Lease) { l.MaxExpireTime = time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC) }},
	{"usage time before 1970", func(l *broker.Lease) { l.Usage.FirstSeen = time.Date(1969, 1, 1, 0, 0, 0, 0, time.UTC) }},
	{"negative sessions", func(l *broker.Lease) { l.Usage.Sessions = -1 }},
}

func testCreateLease(t *testing.T, open OpenFunc) {
	full := NewLease("lease-full", "read_only", "billing", at(15*time.Minute))
	full.LastError = "pg: connection refused"
	full.RevokeAttempts = 3
	full.NextAttempt = at(16 * time.Minute)
	full.RevokeOnDisconnect = true
	full.ValidUntilBehind = true
	full.State = broker.StateRevokeFailed
	full.Usage = broker.LeaseUsage{
		Sessions: 2, PeakSessions: 5, SessionsSeen: 9,
		FirstSeen: at(time.Second), LastSeen: at(2 * time.Minute), LastQueryStart: at(119 * time.Second),
		ApplicationName: "billing-worker", ClientAddr: "10.1.2.3",
	}

	revoked := ended(NewLease("lease-revoked", "admin", "ops", at(time.Minute)), broker.StateRevoked, at(30*time.Second))
	revoked.Metadata = nil
	revoked.Usage = broker.LeaseUsage{PeakSessions: 1, SessionsSeen: 1, FirstSeen: at(time.Second), LastSeen: at(time.Second)}

	local := NewLease("lease-local", "updater", "", time.Date(2030, 5, 6, 7, 8, 9, 10, time.FixedZone("CEST", 2*3600)))
	local.Metadata = map[string]string{}

	for _, l := range []broker.Lease{full, revoked, local} {
		t.Run("round trip "+l.ID, func(t *testing.T) {
			s := open(t)
			in := l.Clone()
			in.Revision = 77 // callers cannot choose the first revision
			if err := s.CreateLease(t.Context(), &in); err != nil {
				t.Fatalf("CreateLease: %v", err)
			}
			if in.Revision == 0 || in.Revision == 77 {
				t.Errorf("CreateLease set Revision %d, want the store's first revision", in.Revision)
			}
			want := l
			want.Revision = in.Revision
			assertLeaseEqual(t, MustGet(t, s, l.ID), want)
		})
	}

	t.Run("existing id", func(t *testing.T) {
		s := open(t)
		first := MustCreate(t, s, NewLease("taken", "ro", "svc", at(time.Minute)))[0]
		if err := s.PutIntent(t.Context(), broker.Intent{LeaseID: "taken", Username: "cb_other"}); err != nil {
			t.Fatal(err)
		}
		dup := NewLease("taken", "rw", "other", at(time.Hour))
		if err := s.CreateLease(t.Context(), &dup); !errors.Is(err, broker.ErrExists) {
			t.Fatalf("CreateLease of a taken id: %v, want ErrExists", err)
		}
		if dup.Revision != 0 {
			t.Errorf("failed CreateLease set Revision %d", dup.Revision)
		}
		assertLeaseEqual(t, MustGet(t, s, "taken"), first)
		// The failed create is a whole: its intent stays, the index
		// holds the first lease only.
		if in, err := s.ListIntents(t.Context()); err != nil || len(in) != 1 {
			t.Errorf("intents after a failed create: %+v, %v; want the intent kept", in, err)
		}
		want := []broker.ExpiryEntry{{Expire: first.ExpireTime, LeaseID: "taken"}}
		if got := ScanExpiry(t, s); len(got) != 1 || got[0].LeaseID != want[0].LeaseID || !got[0].Expire.Equal(want[0].Expire) {
			t.Errorf("ScanExpiry = %+v, want %+v", got, want)
		}
	})

	t.Run("rejects", func(t *testing.T) {
		s := open(t)
		for i, tt := range invalidLeases {
			t.Run(tt.name, func(t *testing.T) {
				l := NewLease(fmt.Sprintf("bad%d", i), "ro", "svc", at(time.Minute))
				tt.mutate(&l)
				if err := s.CreateLease(t.Context(), &l); !errors.Is(err, broker.ErrInvalidArgument) {
					t.Fatalf("CreateLease error %v, want ErrInvalidArgument", err)
				}
				if l.Revision != 0 {
					t.Errorf("failed CreateLease set Revision %d", l.Revision)
				}
			})
		}
		t.Run("nil lease", func(t *testing.T) {
			if err := s.CreateLease(t.Context(), nil); !errors.Is(err, broker.ErrInvalidArgument) {
				t.Errorf("CreateLease(nil) error %v, want ErrInvalidArgument", err)
			}
		})
		// Nothing a rejected create touched may remain.
		if all := listAll(t, s); len(all) != 0 {
			t.Errorf("leases after rejected creates: %q", IDs(all))
		}
		if got := ScanExpiry(t, s); len(got) != 0 {
			t.Errorf("expiry entries after rejected creates: %+v", got)
		}
	})
}

func testGetLease(t *testing.T, open OpenFunc) {
	t.Run("missing", func(t *testing.T) {
		s := open(t)
		MustCreate(t, s, NewLease("present", "ro", "svc", at(time.Minute)))
		for _, id := range []string{"missing", "", "presen", "present2"} {
			if _, err := s.GetLease(t.Context(), id); !errors.Is(err, broker.ErrLeaseNotFound) {
				t.Errorf("GetLease(%q) error %v, want ErrLeaseNotFound", id, err)
			}
		}
	})
	t.Run("the store keeps its own copies", func(t *testing.T) {
		s := open(t)
		in := NewLease("l", "ro", "svc", at(time.Minute))
		if err := s.CreateLease(t.Context(), &in); err != nil {
			t.Fatal(err)
		}
		want := in.Clone()

		in.Metadata["pod"] = "changed by the creator"
		in.Role = "changed"
		got := MustGet(t, s, "l")
		assertLeaseEqual(t, got, want)

		got.Metadata["pod"] = "changed by a reader"
		got.Metadata["new"] = "key"
		got.ExpireTime = at(time.Hour)
		assertLeaseEqual(t, MustGet(t, s, "l"), want)

		upd := MustGet(t, s, "l")
		upd.Metadata["pod"] = "updated"
		stored := MustUpdate(t, s, upd)
		want = upd.Clone()
		want.Revision = stored.Revision
		upd.Metadata["pod"] = "changed by the updater"
		stored.Metadata["pod"] = "changed in the result"
		assertLeaseEqual(t, MustGet(t, s, "l"), want)

		listed := listAll(t, s)
		listed[0].Metadata["pod"] = "changed in a listing"
		assertLeaseEqual(t, MustGet(t, s, "l"), want)
	})
}

func testUpdateLease(t *testing.T, open OpenFunc) {
	tests := []struct {
		name   string
		update func(l broker.Lease) broker.Lease
		want   error
	}{
		{"current revision", func(l broker.Lease) broker.Lease { l.ExpireTime = at(time.Hour); return l }, nil},
		{"every field", func(l broker.Lease) broker.Lease {
			l.Role, l.Client, l.Target, l.Username, l.ProxyRole = "rw", "other", "second", "cb_x", "rw_role"
			l.IssueTime, l.ExpireTime, l.MaxExpireTime = at(time.Second), at(2*time.Hour), at(3*time.Hour)
			l.State, l.LastError, l.RevokeAttempts, l.NextAttempt = broker.StateRevokeFailed, "boom", 4, at(time.Minute)
			l.EndTime, l.RevokeOnDisconnect, l.Metadata = at(90*time.Minute), true, map[string]string{"k": "v"}
			l.Usage = broker.LeaseUsage{Sessions: 1, PeakSessions: 3, SessionsSeen: 4, FirstSeen: at(time.Second),
				LastSeen: at(time.Minute), ApplicationName: "app", ClientAddr: "::1", LastQueryStart: at(59 * time.Second)}
			return l
		}, nil},
		{"stale revision", func(l broker.Lease) broker.Lease { l.Revision--; return l }, broker.ErrConflict},
		{"zero revision", func(l broker.Lease) broker.Lease { l.Revision = 0; return l }, broker.ErrConflict},
		{"future revision", func(l broker.Lease) broker.Lease { l.Revision += 1000; return l }, broker.ErrConflict},
		{"missing lease", func(l broker.Lease) broker.Lease { l.ID = "nope"; return l }, broker.ErrLeaseNotFound},
		{"invalid lease", func(l broker.Lease) broker.Lease { l.State = broker.StateUnspecified; return l }, broker.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t)
			created := MustCreate(t, s, NewLease("l1", "ro", "svc", at(time.Minute)))[0]
			in := tt.update(created.Clone())
			got, err := s.UpdateLease(t.Context(), in)
			if !errors.Is(err, tt.want) {
				t.Fatalf("UpdateLease error %v, want %v", err, tt.want)
			}
			stored := MustGet(t, s, "l1")
			if tt.want != nil {
				assertLeaseEqual(t, stored, created) // untouched
				if got := scanIDs(t, s); !slices.Equal(got, []string{"l1"}) {
					t.Errorf("ScanExpiry after a failed update = %q", got)
				}
				return
			}
			if got.Revision <= created.Revision {
				t.Errorf("update returned revision %d, not after %d", got.Revision, created.Revision)
			}
			assertSameButRevision(t, got, in)
			assertLeaseEqual(t, stored, got)

			// The returned lease is the base for the next update; the
			// one before it is now stale.
			if _, err := s.UpdateLease(t.Context(), in); !errors.Is(err, broker.ErrConflict) {
				t.Errorf("update from the old revision: %v, want ErrConflict", err)
			}
			again := MustUpdate(t, s, got)
			if again.Revision <= got.Revision {
				t.Errorf("second update revision %d, not after %d", again.Revision, got.Revision)
			}
			assertLeaseEqual(t, MustGet(t, s, "l1"), again)
		})
	}
}

func testUpdateLeases(t *testing.T, open OpenFunc) {
	t.Run("per-entry results", func(t *testing.T) {
		s := open(t)
		created := MustCreate(t, s,
			NewLease("a", "ro", "svc", at(4*time.Hour)),
			NewLease("b", "ro", "svc", at(4*time.Hour)),
			NewLease("c", "ro", "svc", at(4*time.Hour)),
		)
		a, b, c := created[0].Clone(), created[1].Clone(), created[2].Clone()
		a.ExpireTime = at(time.Hour)
		b.ExpireTime = at(2 * time.Hour)
		b.Revision += 1000 // not the stored revision: conflict
		c.ExpireTime = at(3 * time.Hour)
		missing := NewLease("zz", "ro", "svc", at(time.Hour))
		missing.Revision = created[0].Revision
		invalid := created[2].Clone()
		invalid.State = broker.StateUnspecified
		a2 := a.Clone() // the same lease twice: the second is based on a moved revision

		in := []broker.Lease{a, b, missing, c, invalid, a2}
		got, errs := s.UpdateLeases(t.Context(), in)
		if len(got) != len(in) || len(errs) != len(in) {
			t.Fatalf("UpdateLeases returned %d leases and %d errors for %d inputs", len(got), len(errs), len(in))
		}
		want := []error{nil, broker.ErrConflict, broker.ErrLeaseNotFound, nil, broker.ErrInvalidArgument, broker.ErrConflict}
		for i, w := range want {
			if w == nil && errs[i] != nil || w != nil && !errors.Is(errs[i], w) {
				t.Errorf("entry %d (%s): error %v, want %v", i, in[i].ID, errs[i], w)
			}
			if w != nil && !reflect.DeepEqual(got[i], broker.Lease{}) {
				t.Errorf("entry %d (%s) failed but returned lease %+v", i, in[i].ID, got[i])
			}
		}
		for _, i := range []int{0, 3} {
			if got[i].Revision <= in[i].Revision {
				t.Errorf("entry %d (%s): revision %d, not after %d", i, in[i].ID, got[i].Revision, in[i].Revision)
			}
			assertSameButRevision(t, got[i], in[i])
			assertLeaseEqual(t, MustGet(t, s, in[i].ID), got[i])
		}
		assertLeaseEqual(t, MustGet(t, s, "b"), created[1]) // untouched
		if _, err := s.GetLease(t.Context(), "zz"); !errors.Is(err, broker.ErrLeaseNotFound) {
			t.Errorf("a failed update of a missing lease created it: %v", err)
		}

		// The expiry index moved with the updated leases, earlier (a
		// store may leave an entry behind when a lease moves later:
		// ScanExpiry).
		if order := scanIDs(t, s); !slices.Equal(order, []string{"a", "c", "b"}) {
			t.Errorf("expiry order %q, want [a c b]", order)
		}
	})
	t.Run("empty", func(t *testing.T) {
		s := open(t)
		got, errs := s.UpdateLeases(t.Context(), nil)
		if len(got) != 0 || len(errs) != 0 {
			t.Errorf("UpdateLeases(nil) = %v, %v", got, errs)
		}
	})
}

func testDeleteLease(t *testing.T, open OpenFunc) {
	s := open(t)
	MustCreate(t, s,
		NewLease("live", "ro", "svc", at(time.Minute)),
		ended(NewLease("ended", "ro", "svc", at(time.Minute)), broker.StateExpired, at(time.Minute)),
		NewLease("keep", "ro", "svc", at(2*time.Minute)),
		ended(NewLease("keep-ended", "ro", "svc", at(time.Minute)), broker.StateRevoked, at(2*time.Minute)),
	)
	for _, id := range []string{"live", "ended", "missing", "live"} {
		t.Run(id, func(t *testing.T) {
			if err := s.DeleteLease(t.Context(), id); err != nil {
				t.Fatalf("DeleteLease: %v", err)
			}
			if _, err := s.GetLease(t.Context(), id); !errors.Is(err, broker.ErrLeaseNotFound) {
				t.Errorf("GetLease after delete: %v, want ErrLeaseNotFound", err)
			}
		})
	}
	t.Run("gone from listings and indexes", func(t *testing.T) {
		if got := IDs(listAll(t, s)); !slices.Equal(got, []string{"keep", "keep-ended"}) {
			t.Errorf("ListLeases after deletes = %q", got)
		}
		if got := scanIDs(t, s); !slices.Equal(got, []string{"keep"}) {
			t.Errorf("ScanExpiry after deletes = %q", got)
		}
		// The deleted tombstone is not purged again (nor counted).
		n, err := s.PurgeTombstones(t.Context(), at(time.Hour), 10)
		if err != nil || n != 1 {
			t.Errorf("PurgeTombstones after deletes = %d, %v; want 1", n, err)
		}
	})
	t.Run("id can be created again", func(t *testing.T) {
		MustCreate(t, s, NewLease("live", "rw", "svc", at(3*time.Minute)))
		if got := scanIDs(t, s); !slices.Equal(got, []string{"keep", "live"}) {
			t.Errorf("ScanExpiry = %q", got)
		}
	})
}

func testListLeases(t *testing.T, open OpenFunc) {
	s := open(t)
	roles := []string{"read_only", "updater", "admin"}
	clients := []string{"billing", "search"}
	var all []broker.Lease
	for i := range 30 {
		// Inserted in an order unlike the id order.
		l := NewLease(fmt.Sprintf("lease-%03d", (i*7)%30), roles[i%3], clients[i%2], at(time.Duration(i)*time.Second))
		if i%5 == 0 {
			l = ended(l, broker.StateRevoked, at(time.Hour))
		}
		if i%7 == 0 {
			l.State = broker.StateRevoking
		}
		all = append(all, MustCreate(t, s, l)...)
	}
	slices.SortFunc(all, func(a, b broker.Lease) int { return strings.Compare(a.ID, b.ID) })

	filters := []struct {
		name string
		f    broker.LeaseFilter
	}{
		{"everything", broker.LeaseFilter{}},
		{"role", broker.LeaseFilter{Role: "updater"}},
		{"client", broker.LeaseFilter{Client: "search"}},
		{"state", broker.LeaseFilter{State: broker.StateRevoked}},
		{"role and client", broker.LeaseFilter{Role: "admin", Client: "billing"}},
		{"role client state", broker.LeaseFilter{Role: "read_only", Client: "billing", State: broker.StateActive}},
		{"no match", broker.LeaseFilter{Role: "nobody"}},
	}
	for _, tt := range filters {
		var want []broker.Lease
		for _, l := range all {
			if tt.f.Match(&l) {
				want = append(want, l)
			}
		}
		t.Run(tt.name, func(t *testing.T) {
			got, next, err := s.ListLeases(t.Context(), tt.f)
			if err != nil {
				t.Fatal(err)
			}
			if next != "" {
				t.Errorf("unlimited listing returned next %q", next)
			}
			if !slices.Equal(IDs(got), IDs(want)) {
				t.Fatalf("ListLeases = %q, want %q", IDs(got), IDs(want))
			}
			for i := range got {
				assertLeaseEqual(t, got[i], want[i])
			}
		})
		// Every page size, including ones that divide the result exactly
		// (the last full page must not promise a next page) and ones
		// larger than it.
		for limit := 1; limit <= len(want)+1; limit++ {
			t.Run(fmt.Sprintf("%s/pages of %d", tt.name, limit), func(t *testing.T) {
				f := tt.f
				f.Limit = limit
				var got []broker.Lease
				for page := 0; ; page++ {
					if page > len(all) {
						t.Fatal("paging does not terminate")
					}
					leases, next, err := s.ListLeases(t.Context(), f)
					if err != nil {
						t.Fatal(err)
					}
					if len(leases) > limit {
						t.Fatalf("page of %d leases, limit %d", len(leases), limit)
					}
					if page > 0 && len(leases) == 0 {
						t.Fatalf("next %q promised a page, which is empty", f.After)
					}
					got = append(got, leases...)
					if next == "" {
						break
					}
					if len(leases) != limit || next != leases[len(leases)-1].ID {
						t.Fatalf("next %q after a page of %d ending %q", next, len(leases), IDs(leases))
					}
					f.After = next
				}
				if !slices.Equal(IDs(got), IDs(want)) {
					t.Errorf("pages joined = %q, want %q", IDs(got), IDs(want))
				}
			})
		}
	}

	t.Run("after an id that does not exist", func(t *testing.T) {
		got, next, err := s.ListLeases(t.Context(), broker.LeaseFilter{After: "lease-0145", Limit: 2})
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"lease-015", "lease-016"}; !slices.Equal(IDs(got), want) || next != "lease-016" {
			t.Errorf("got %q, next %q; want %q, next lease-016", IDs(got), next, want)
		}
	})
	t.Run("after the last id", func(t *testing.T) {
		got, next, err := s.ListLeases(t.Context(), broker.LeaseFilter{After: "lease-029"})
		if err != nil || len(got) != 0 || next != "" {
			t.Errorf("got %q, next %q, %v; want nothing", IDs(got), next, err)
		}
	})
	t.Run("ascending bytewise", func(t *testing.T) {
		s := open(t)
		MustCreate(t, s,
			NewLease("b", "ro", "svc", at(time.Minute)),
			NewLease("B", "ro", "svc", at(time.Minute)),
			NewLease("a-1", "ro", "svc", at(time.Minute)),
			NewLease("a", "ro", "svc", at(time.Minute)),
			NewLease("a_1", "ro", "svc", at(time.Minute)),
		)
		if got, want := IDs(listAll(t, s)), []string{"B", "a", "a-1", "a_1", "b"}; !slices.Equal(got, want) {
			t.Errorf("ListLeases order %q, want %q", got, want)
		}
	})
	t.Run("negative limit", func(t *testing.T) {
		if _, _, err := s.ListLeases(t.Context(), broker.LeaseFilter{Limit: -1}); !errors.Is(err, broker.ErrInvalidArgument) {
			t.Errorf("error %v, want ErrInvalidArgument", err)
		}
	})
}
