package store

import (
	"path/filepath"
	"reflect"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

func lastIssued(t *testing.T, s *Store) map[string]time.Time {
	t.Helper()
	got, err := s.LastIssued(t.Context())
	if err != nil {
		t.Fatalf("LastIssued: %v", err)
	}
	return got
}

// issuedAt returns a lease issued at issue; ended ones are tombstones.
func issuedAt(id, role string, issue time.Time, ended bool) broker.Lease {
	l := newLease(id, role, "svc", issue.Add(time.Hour))
	l.IssueTime, l.MaxExpireTime = issue, issue.Add(2*time.Hour)
	if ended {
		l.State, l.EndTime = broker.StateExpired, issue.Add(time.Hour)
	}
	return l
}

func schemaVersionOf(t *testing.T, s *Store) uint64 {
	t.Helper()
	var v uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		v, err = decodeSchemaVersion(tx.Bucket(bucketMeta).Get(metaKeySchemaVersion))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestLastIssued follows a role's last issue time through creates and
// imports (forward only), tombstone purges and a restart.
func TestLastIssued(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leases.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	ctx := t.Context()

	if v := schemaVersionOf(t, s); v != schemaVersion {
		t.Errorf("new file at schema version %d, want %d", v, schemaVersion)
	}
	if got := lastIssued(t, s); len(got) != 0 {
		t.Errorf("LastIssued of a new store = %v, want empty", got)
	}

	steps := []struct {
		name string
		do   func(t *testing.T)
		want map[string]time.Time
	}{
		{
			name: "CreateLease moves forward only",
			do: func(t *testing.T) {
				mustCreate(t, s,
					issuedAt("a", "ro", at(time.Hour), false),
					issuedAt("b", "ro", at(0), false), // older: no move back
					issuedAt("c", "rw", at(2*time.Hour), true),
				)
			},
			want: map[string]time.Time{"ro": at(time.Hour), "rw": at(2 * time.Hour)},
		},
		{
			name: "ImportLeases moves forward only",
			do: func(t *testing.T) {
				err := s.ImportLeases(ctx, []broker.Lease{
					issuedAt("d", "ro", at(-time.Hour), true), // older
					issuedAt("e", "rw", at(3*time.Hour), true),
					issuedAt("f", "rw", at(150*time.Minute), false), // older than e, same import
					issuedAt("g", "admin", at(5*time.Minute), true),
				})
				if err != nil {
					t.Fatal(err)
				}
			},
			want: map[string]time.Time{"ro": at(time.Hour), "rw": at(3 * time.Hour), "admin": at(5 * time.Minute)},
		},
		{
			name: "a failed import leaves it alone",
			do: func(t *testing.T) {
				err := s.ImportLeases(ctx, []broker.Lease{
					issuedAt("h", "ro", at(9*time.Hour), true),
					issuedAt("a", "ro", at(9*time.Hour), true), // exists
				})
				if err == nil {
					t.Fatal("import of an existing id succeeded")
				}
			},
			want: map[string]time.Time{"ro": at(time.Hour), "rw": at(3 * time.Hour), "admin": at(5 * time.Minute)},
		},
		{
			name: "survives the purge of every tombstone",
			do: func(t *testing.T) {
				// End the newest ro lease too, so no record of it is left.
				a := mustGet(t, s, "a")
				a.State, a.EndTime = broker.StateRevoked, at(time.Hour)
				mustUpdate(t, s, a)
				if _, err := s.PurgeTombstones(ctx, at(24*time.Hour), 100); err != nil {
					t.Fatal(err)
				}
				left, _, err := s.ListLeases(ctx, broker.LeaseFilter{})
				if err != nil {
					t.Fatal(err)
				}
				if got := ids(left); !reflect.DeepEqual(got, []string{"b", "f"}) {
					t.Fatalf("leases left after the purge: %v, want [b f]", got)
				}
			},
			want: map[string]time.Time{"ro": at(time.Hour), "rw": at(3 * time.Hour), "admin": at(5 * time.Minute)},
		},
		{
			name: "survives close and reopen",
			do: func(t *testing.T) {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				if s, err = Open(path, Options{NoSync: true}); err != nil {
					t.Fatal(err)
				}
			},
			want: map[string]time.Time{"ro": at(time.Hour), "rw": at(3 * time.Hour), "admin": at(5 * time.Minute)},
		},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			step.do(t)
			if got := lastIssued(t, s); !reflect.DeepEqual(got, step.want) {
				t.Errorf("LastIssued = %v, want %v", got, step.want)
			}
		})
	}
}

// TestOpenBuildsActivityOfOldFile opens a file as schema version 1 wrote
// it, without the activity bucket: Open builds the bucket from the leases
// once, skipping a record it cannot decode, and moves the file to the
// current version.
func TestOpenBuildsActivityOfOldFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leases.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	mustCreate(t, s,
		issuedAt("a", "ro", at(time.Hour), true),
		issuedAt("b", "ro", at(2*time.Hour), false),
		issuedAt("c", "rw", at(0), true),
	)
	err = s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketActivity); err != nil {
			return err
		}
		if err := tx.Bucket(bucketLeases).Put([]byte("damaged"), []byte{9, 9}); err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(metaKeySchemaVersion, encodeSchemaVersion(1))
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatalf("open a version 1 file: %v", err)
	}
	defer s.Close()
	want := map[string]time.Time{"ro": at(2 * time.Hour), "rw": at(0)}
	if got := lastIssued(t, s); !reflect.DeepEqual(got, want) {
		t.Errorf("LastIssued of a version 1 file = %v, want %v", got, want)
	}
	if v := schemaVersionOf(t, s); v != schemaVersion {
		t.Errorf("schema version after open = %d, want %d", v, schemaVersion)
	}
	// Built once: from now on creates keep it up to date.
	mustCreate(t, s, issuedAt("d", "rw", at(3*time.Hour), false))
	want["rw"] = at(3 * time.Hour)
	if got := lastIssued(t, s); !reflect.DeepEqual(got, want) {
		t.Errorf("LastIssued after a create = %v, want %v", got, want)
	}
}
