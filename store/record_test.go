package store

import (
	"errors"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

func sampleRecord(t testing.TB) []byte {
	t.Helper()
	l := newLease("id", "read_only", "billing", at(time.Minute))
	l.State, l.EndTime, l.LastError, l.NextAttempt = broker.StateRevokeFailed, at(time.Hour), "boom", at(2*time.Minute)
	l.Revision, l.RevokeAttempts, l.RevokeOnDisconnect = 7, 2, true
	b, _, err := encodeLease(&l)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDecodeDamagedRecords feeds the decoders every truncation and a few
// corruptions of valid records: each must fail with errCorrupt, never panic
// or return a half-read record.
func TestDecodeDamagedRecords(t *testing.T) {
	lease := sampleRecord(t)
	in := broker.Intent{LeaseID: "id", Target: "main", Username: "u", ProxyRole: "r", CreateTime: t0}
	intent, err := encodeIntent(&in)
	if err != nil {
		t.Fatal(err)
	}
	decoders := []struct {
		name   string
		record []byte
		decode func([]byte) error
	}{
		{"lease", lease, func(b []byte) error { _, err := decodeLease("id", b); return err }},
		{"intent", intent, func(b []byte) error { _, err := decodeIntent("id", b); return err }},
	}
	for _, d := range decoders {
		t.Run(d.name, func(t *testing.T) {
			if err := d.decode(d.record); err != nil {
				t.Fatalf("valid record: %v", err)
			}
			for n := range len(d.record) {
				if err := d.decode(d.record[:n]); !errors.Is(err, errCorrupt) {
					t.Errorf("record cut to %d bytes: %v, want errCorrupt", n, err)
				}
			}
			wrongFormat := append([]byte{99}, d.record[1:]...)
			if err := d.decode(wrongFormat); !errors.Is(err, errCorrupt) {
				t.Errorf("unknown format: %v, want errCorrupt", err)
			}
			// A later format may append fields; this one ignores them.
			if err := d.decode(append(d.record[:len(d.record):len(d.record)], 1, 2, 3)); err != nil {
				t.Errorf("record with trailing bytes: %v", err)
			}
		})
	}
	t.Run("huge lengths", func(t *testing.T) {
		// Format, state, revision, expire, end, then a role length of 2^63.
		b := []byte{leaseFormat1, 1, 1, 1, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}
		if _, err := decodeLease("id", b); !errors.Is(err, errCorrupt) {
			t.Errorf("huge string length: %v, want errCorrupt", err)
		}
	})
}

func TestTimeKeys(t *testing.T) {
	for _, k := range [][]byte{nil, {1, 2, 3}, make([]byte, 8), {0xff, 0, 0, 0, 0, 0, 0, 0, 'x'}} {
		if _, _, err := parseTimeKey(k); err == nil {
			t.Errorf("parseTimeKey(%v) accepted a malformed key", k)
		}
	}
	n, id, err := parseTimeKey(timeKey(at(0).UnixNano(), "abc"))
	if err != nil || n != at(0).UnixNano() || id != "abc" {
		t.Errorf("round trip = %d, %q, %v", n, id, err)
	}
}

func FuzzDecodeLease(f *testing.F) {
	f.Add(sampleRecord(f))
	f.Add([]byte{})
	f.Add([]byte{leaseFormat1})
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := decodeLease("id", b)
		if err != nil {
			return
		}
		// Whatever decodes must encode again: the store must be able to
		// rewrite any record it can read. Invalid leases are allowed to be
		// rejected, but not to panic.
		_, _, _ = encodeLease(&l)
	})
}

// The usage is an optional trailing section: a record with it decodes to
// the same usage, one cut inside it is corrupt, and a usage format this
// binary does not know reads as no usage.
func TestLeaseUsageRecord(t *testing.T) {
	at := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	l := broker.Lease{ID: "id", State: broker.StateActive, ExpireTime: at.Add(time.Hour),
		Usage: broker.LeaseUsage{Sessions: 2, PeakSessions: 3, SessionsSeen: 7, FirstSeen: at, LastSeen: at.Add(time.Minute),
			ApplicationName: "billing", ClientAddr: "10.0.0.7", LastQueryStart: at.Add(59 * time.Second)}}
	rec, _, err := encodeLease(&l)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeLease("id", rec)
	if err != nil {
		t.Fatal(err)
	}
	if got.Usage != l.Usage {
		t.Errorf("usage = %+v, want %+v", got.Usage, l.Usage)
	}
	bare := l
	bare.Usage = broker.LeaseUsage{}
	bareRec, _, err := encodeLease(&bare)
	if err != nil {
		t.Fatal(err)
	}
	for n := len(bareRec) + 1; n < len(rec); n++ {
		if _, err := decodeLease("id", rec[:n]); !errors.Is(err, errCorrupt) {
			t.Errorf("record cut to %d bytes, inside the usage: %v, want errCorrupt", n, err)
		}
	}
	unknown := append(bareRec[:len(bareRec):len(bareRec)], 2, 9, 9)
	got, err = decodeLease("id", unknown)
	if err != nil || got.Usage != (broker.LeaseUsage{}) {
		t.Errorf("unknown usage format: %+v, %v; want no usage, no error", got.Usage, err)
	}
}
