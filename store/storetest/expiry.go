package storetest

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// checkEntry checks an expiry entry against its lease: the attention time
// always, the details when the entry carries them (Username set).
func checkEntry(t *testing.T, e broker.ExpiryEntry, l broker.Lease) {
	t.Helper()
	due := attentionOf(l)
	checkEntryBetween(t, e, l, due)
}

// attentionOf is the instant a live lease needs attention.
func attentionOf(l broker.Lease) time.Time {
	if !l.EndTime.IsZero() && l.EndTime.Before(l.ExpireTime) {
		return l.EndTime
	}
	return l.ExpireTime
}

// checkEntryBetween is checkEntry of a lease whose entry may have stayed
// at an earlier instant (ScanExpiry: after renewals), no earlier than
// floor.
func checkEntryBetween(t *testing.T, e broker.ExpiryEntry, l broker.Lease, floor time.Time) {
	t.Helper()
	if due := attentionOf(l); e.Expire.Before(floor) || e.Expire.After(due) {
		t.Errorf("expiry entry %s at %v, want from %v to %v", e.LeaseID, e.Expire, floor, due)
	}
	if e.Username == "" {
		if e.State != broker.StateUnspecified || e.Target != "" || e.RevokeOnDisconnect {
			t.Errorf("expiry entry %s without a username has details %+v", e.LeaseID, e)
		}
		return
	}
	want := broker.ExpiryEntry{Expire: e.Expire, LeaseID: l.ID, State: l.State, Target: l.Target,
		Username: l.Username, RevokeOnDisconnect: l.RevokeOnDisconnect}
	if !reflect.DeepEqual(e, want) {
		t.Errorf("expiry entry %+v, want %+v", e, want)
	}
}

func testScanExpiry(t *testing.T, open OpenFunc) {
	t.Run("live leases in order of attention", func(t *testing.T) {
		s := open(t)
		leases := map[string]broker.Lease{}
		var want []string
		for i := range 10 {
			id := fmt.Sprintf("lease-%02d", 9-i) // insertion order differs from expiry order
			l := NewLease(id, "ro", "svc", at(time.Duration(i)*time.Second))
			l.RevokeOnDisconnect = i%2 == 0
			l.Target = fmt.Sprintf("target-%d", i%3)
			leases[id] = MustCreate(t, s, l)[0]
			want = append(want, id)
		}
		// Ties on the instant go in id order.
		for _, id := range []string{"tie-b", "tie-a"} {
			leases[id] = MustCreate(t, s, NewLease(id, "ro", "svc", at(20*time.Second)))[0]
		}
		want = append(want, "tie-a", "tie-b")
		// A revocation under way (EndTime before ExpireTime) is due at
		// its EndTime; an EndTime after ExpireTime changes nothing.
		early := NewLease("early-end", "ro", "svc", at(time.Hour))
		early.State, early.EndTime = broker.StateRevoking, at(3500*time.Millisecond)
		late := NewLease("late-end", "ro", "svc", at(15*time.Second))
		late.State, late.EndTime, late.LastError = broker.StateRevokeFailed, at(time.Hour), "boom"
		for _, l := range MustCreate(t, s, early, late) {
			leases[l.ID] = l
		}
		want = slices.Insert(want, 4, "early-end") // between 3s and 4s
		want = slices.Insert(want, 11, "late-end")
		// Terminal leases are not in it, whatever their times.
		MustCreate(t, s,
			ended(NewLease("dead", "ro", "svc", at(0)), broker.StateExpired, at(0)),
			ended(NewLease("gone", "ro", "svc", at(time.Hour)), broker.StateRevoked, at(time.Second)),
		)

		got := ScanExpiry(t, s)
		var gotIDs []string
		for _, e := range got {
			gotIDs = append(gotIDs, e.LeaseID)
			checkEntry(t, e, leases[e.LeaseID])
		}
		if !slices.Equal(gotIDs, want) {
			t.Errorf("ScanExpiry order %q, want %q", gotIDs, want)
		}
	})

	t.Run("stops when fn returns false", func(t *testing.T) {
		s := open(t)
		for i := range 5 {
			MustCreate(t, s, NewLease(fmt.Sprintf("l%d", i), "ro", "svc", at(time.Duration(i)*time.Second)))
		}
		var got []string
		err := s.ScanExpiry(t.Context(), func(e broker.ExpiryEntry) bool {
			got = append(got, e.LeaseID)
			return len(got) < 3
		})
		if err != nil {
			t.Fatalf("ScanExpiry stopped early: %v, want nil", err)
		}
		if want := []string{"l0", "l1", "l2"}; !slices.Equal(got, want) {
			t.Errorf("ScanExpiry stopped with %q, want %q", got, want)
		}
	})

	t.Run("empty store", func(t *testing.T) {
		if got := ScanExpiry(t, open(t)); len(got) != 0 {
			t.Errorf("ScanExpiry of an empty store = %+v", got)
		}
	})

	// Updates move a lease in the order, and out of it when it ends. An
	// update that moves a lease later and changes none of its entry's
	// details (a renewal) may leave its entry where it was; one that
	// moves it earlier or changes a detail may not (floor).
	t.Run("follows updates", func(t *testing.T) {
		s := open(t)
		leases := map[string]broker.Lease{}
		floor := map[string]time.Time{}
		for _, l := range MustCreate(t, s,
			NewLease("a", "ro", "svc", at(3*time.Minute)),
			NewLease("b", "ro", "svc", at(1*time.Minute)),
			NewLease("c", "rw", "svc", at(2*time.Minute)),
			NewLease("d", "rw", "svc", at(2*time.Minute)), // ties with c: id order
		) {
			leases[l.ID] = l
			floor[l.ID] = l.ExpireTime
		}
		steps := []struct {
			name   string
			id     string
			change func(l *broker.Lease)
			want   []string
		}{
			{"initial", "", nil, []string{"b", "c", "d", "a"}},
			{"renew b past a", "b", func(l *broker.Lease) { l.ExpireTime = at(4 * time.Minute) }, []string{"c", "d", "a", "b"}},
			{"revoking keeps d live", "d", func(l *broker.Lease) { l.State = broker.StateRevoking }, []string{"c", "d", "a", "b"}},
			{"revoke failed with retry time", "d", func(l *broker.Lease) {
				l.State, l.ExpireTime, l.LastError = broker.StateRevokeFailed, at(5*time.Minute), "boom"
			}, []string{"c", "a", "b", "d"}},
			{"admin revocation under way moves b first", "b", func(l *broker.Lease) {
				l.State, l.EndTime = broker.StateRevoking, at(30*time.Second)
			}, []string{"b", "c", "a", "d"}},
			{"a revoked", "a", func(l *broker.Lease) { l.State, l.EndTime = broker.StateRevoked, at(10*time.Minute) }, []string{"b", "c", "d"}},
			{"c expired", "c", func(l *broker.Lease) { l.State, l.EndTime = broker.StateExpired, at(9*time.Minute) }, []string{"b", "d"}},
			{"d revoked", "d", func(l *broker.Lease) { l.State, l.EndTime = broker.StateRevoked, at(8*time.Minute) }, []string{"b"}},
			{"b revoked", "b", func(l *broker.Lease) { l.State = broker.StateRevoked }, nil},
		}
		for _, step := range steps {
			t.Run(step.name, func(t *testing.T) {
				if step.change != nil {
					old := leases[step.id]
					l := old
					step.change(&l)
					leases[step.id] = MustUpdate(t, s, l)
					if l.State != old.State || attentionOf(l).Before(attentionOf(old)) {
						floor[step.id] = attentionOf(l)
					}
				}
				var got []string
				entries := ScanExpiry(t, s)
				for i, e := range entries {
					checkEntryBetween(t, e, leases[e.LeaseID], floor[e.LeaseID])
					got = append(got, e.LeaseID)
					if i > 0 && (e.Expire.Before(entries[i-1].Expire) || e.Expire.Equal(entries[i-1].Expire) && e.LeaseID < entries[i-1].LeaseID) {
						t.Errorf("ScanExpiry entry %s at %v after %s at %v: out of order", e.LeaseID, e.Expire, entries[i-1].LeaseID, entries[i-1].Expire)
					}
				}
				// The order by the entries' instants; where every entry is
				// at its lease's attention instant, that is the wanted one.
				if want := slices.Sorted(slices.Values(step.want)); !slices.Equal(slices.Sorted(slices.Values(got)), want) {
					t.Errorf("ScanExpiry leases %q, want %q", got, step.want)
				}
				if exact(entries, leases) && !slices.Equal(got, step.want) {
					t.Errorf("ScanExpiry order %q, want %q", got, step.want)
				}
			})
		}
	})
}

// exact reports whether every entry is at its lease's attention instant.
func exact(entries []broker.ExpiryEntry, leases map[string]broker.Lease) bool {
	for _, e := range entries {
		if !e.Expire.Equal(attentionOf(leases[e.LeaseID])) {
			return false
		}
	}
	return true
}

func testPurgeTombstones(t *testing.T, open OpenFunc) {
	// Five terminal leases ended at minutes 1..5 (created out of order, in
	// both terminal states), one live lease, and one live lease with an
	// EndTime long past (a revocation under way): no purge may touch the
	// live ones.
	setup := func(t *testing.T) broker.LeaseStore {
		t.Helper()
		s := open(t)
		for _, m := range []int{3, 1, 5, 2, 4} {
			state := broker.StateRevoked
			if m%2 == 0 {
				state = broker.StateExpired
			}
			end := at(time.Duration(m) * time.Minute)
			MustCreate(t, s, ended(NewLease(fmt.Sprintf("t%d", m), "ro", "svc", end.Add(time.Hour)), state, end))
		}
		revoking := NewLease("revoking", "ro", "svc", at(time.Hour))
		revoking.State, revoking.EndTime = broker.StateRevoking, at(-time.Minute)
		MustCreate(t, s, NewLease("live", "ro", "svc", at(0)), revoking)
		return s
	}
	tombstones := []string{"t1", "t2", "t3", "t4", "t5"}
	tests := []struct {
		name        string
		endedBefore time.Time
		limit       int
		wantPurged  []string
		wantErr     error
	}{
		{"nothing ended before", at(time.Minute), 10, nil, nil},
		{"strictly before the cutoff", at(3 * time.Minute), 10, []string{"t1", "t2"}, nil},
		{"limit takes the oldest", at(time.Hour), 2, []string{"t1", "t2"}, nil},
		{"limit of one", at(time.Hour), 1, []string{"t1"}, nil},
		{"limit equal to what qualifies", at(time.Hour), 5, tombstones, nil},
		{"all tombstones", at(time.Hour), 100, tombstones, nil},
		{"far future cutoff", time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC), 100, tombstones, nil},
		{"zero cutoff", time.Time{}, 10, nil, nil},
		{"cutoff in year 1000", time.Date(1000, 1, 1, 0, 0, 0, 0, time.UTC), 10, nil, nil},
		{"zero limit", at(time.Hour), 0, nil, broker.ErrInvalidArgument},
		{"negative limit", at(time.Hour), -1, nil, broker.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := setup(t)
			n, err := s.PurgeTombstones(t.Context(), tt.endedBefore, tt.limit)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("PurgeTombstones error %v, want %v", err, tt.wantErr)
			}
			if n != len(tt.wantPurged) {
				t.Errorf("purged %d, want %d", n, len(tt.wantPurged))
			}
			left := IDs(listAll(t, s))
			for _, id := range append(slices.Clone(tombstones), "live", "revoking") {
				gone := slices.Contains(tt.wantPurged, id)
				if present := slices.Contains(left, id); gone == present {
					t.Errorf("lease %s: present=%v, want purged=%v", id, present, gone)
				}
			}
			if got := scanIDs(t, s); !slices.Equal(got, []string{"revoking", "live"}) {
				t.Errorf("ScanExpiry after purge = %q", got)
			}
		})
	}

	t.Run("repeated until fewer than limit", func(t *testing.T) {
		s := setup(t)
		var got []int
		for {
			n, err := s.PurgeTombstones(t.Context(), at(time.Hour), 2)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, n)
			if n < 2 || len(got) > 5 {
				break
			}
		}
		if !slices.Equal(got, []int{2, 2, 1}) {
			t.Errorf("purges of 2 returned %v, want [2 2 1]", got)
		}
	})

	// The purge follows the tombstone's current EndTime, and a lease
	// that ended is purged only once it is terminal.
	t.Run("follows updates", func(t *testing.T) {
		s := setup(t)
		t1 := MustGet(t, s, "t1")
		t1.EndTime = at(10 * time.Minute) // now the newest tombstone
		MustUpdate(t, s, t1)
		live := MustGet(t, s, "live")
		MustUpdate(t, s, ended(live, broker.StateExpired, at(30*time.Second))) // now the oldest
		n, err := s.PurgeTombstones(t.Context(), at(time.Hour), 2)
		if err != nil || n != 2 {
			t.Fatalf("PurgeTombstones = %d, %v; want 2", n, err)
		}
		if got, want := IDs(listAll(t, s)), []string{"revoking", "t1", "t3", "t4", "t5"}; !slices.Equal(got, want) {
			t.Errorf("leases left %q, want %q", got, want)
		}
		// A tombstone brought back to life (an update to a live state)
		// leaves the purge.
		t3 := MustGet(t, s, "t3")
		t3.State = broker.StateRevokeFailed
		MustUpdate(t, s, t3)
		n, err = s.PurgeTombstones(t.Context(), at(time.Hour), 100)
		if err != nil || n != 3 {
			t.Fatalf("PurgeTombstones = %d, %v; want 3", n, err)
		}
		if got, want := IDs(listAll(t, s)), []string{"revoking", "t3"}; !slices.Equal(got, want) {
			t.Errorf("leases left %q, want %q", got, want)
		}
	})
}

// testLastIssued checks broker.LastIssuedReader, for stores that offer it.
func testLastIssued(t *testing.T, open OpenFunc) {
	s := open(t)
	r, ok := s.(broker.LastIssuedReader)
	if !ok {
		t.Skip("the store is not a broker.LastIssuedReader")
	}
	check := func(t *testing.T, want map[string]time.Time) {
		t.Helper()
		got, err := r.LastIssued(t.Context())
		if err != nil {
			t.Fatalf("LastIssued: %v", err)
		}
		for role, tm := range got {
			got[role] = normalizeTime(tm)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("LastIssued = %v, want %v", got, want)
		}
	}
	issued := func(id, role string, issue time.Time) broker.Lease {
		l := NewLease(id, role, "svc", at(10*time.Hour))
		l.IssueTime = issue
		return l
	}

	check(t, map[string]time.Time{})
	MustCreate(t, s,
		issued("a", "ro", at(time.Hour)),
		issued("b", "ro", at(0)), // older: no move back
		ended(issued("c", "rw", at(2*time.Hour)), broker.StateExpired, at(3*time.Hour)),
		issued("d", "", at(5*time.Hour)), // no role: nothing to remember
		issued("e", "zero", time.Time{}), // no issue time: nothing to remember
	)
	want := map[string]time.Time{"ro": at(time.Hour), "rw": at(2 * time.Hour)}
	check(t, want)

	// A failed create moves nothing.
	dup := issued("a", "ro", at(9*time.Hour))
	if err := s.CreateLease(t.Context(), &dup); !errors.Is(err, broker.ErrExists) {
		t.Fatalf("CreateLease of a taken id: %v", err)
	}
	check(t, want)

	// Updates do not move it; deletes and purges do not forget it.
	a := MustGet(t, s, "a")
	a.IssueTime = at(8 * time.Hour)
	MustUpdate(t, s, ended(a, broker.StateRevoked, at(4*time.Hour)))
	if err := s.DeleteLease(t.Context(), "b"); err != nil {
		t.Fatal(err)
	}
	if n, err := s.PurgeTombstones(t.Context(), at(24*time.Hour), 100); err != nil || n != 2 {
		t.Fatalf("PurgeTombstones = %d, %v; want 2", n, err)
	}
	check(t, want)
}
