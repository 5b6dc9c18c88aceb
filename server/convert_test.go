package server

import (
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

func TestLeaseRoundTrip(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC)
	full := broker.Lease{
		ID: "abcdefghijklmnopqrstuvwxyz234567", Role: "read_only", Client: "svc",
		Target: "main", Username: "cb_read_only_x",
		IssueTime: now, ExpireTime: now.Add(time.Minute), MaxExpireTime: now.Add(time.Hour),
		EndTime: now.Add(2 * time.Minute), State: broker.StateRevokeFailed,
		Metadata: map[string]string{"pod": "a"}, LastError: "boom", RevokeOnDisconnect: true,
		Usage: broker.LeaseUsage{Sessions: 1, PeakSessions: 3, SessionsSeen: 7, FirstSeen: now.Add(time.Second),
			LastSeen: now.Add(time.Minute), ApplicationName: "billing", ClientAddr: "10.0.0.1", LastQueryStart: now.Add(59 * time.Second)},
	}
	for name, l := range map[string]broker.Lease{
		"full": full,
		// Zero instants must become unset fields, not 0001-01-01.
		"zero": {ID: "abcdefghijklmnopqrstuvwxyz234567", State: broker.StateActive},
	} {
		t.Run(name, func(t *testing.T) {
			p := leaseToProto(l)
			if l.EndTime.IsZero() && p.EndTime != nil {
				t.Errorf("zero EndTime became %v", p.EndTime)
			}
			if l.IssueTime.IsZero() && p.IssueTime != nil {
				t.Errorf("zero IssueTime became %v", p.IssueTime)
			}
			if l.Usage.Used() != (p.GetUsage() != nil) {
				t.Errorf("usage %+v became %v", l.Usage, p.GetUsage())
			}
			// Through the wire and back.
			b, err := proto.Marshal(p)
			if err != nil {
				t.Fatal(err)
			}
			var q pb.Lease
			if err := proto.Unmarshal(b, &q); err != nil {
				t.Fatal(err)
			}
			back := leaseFromProto(&q)
			if !reflect.DeepEqual(back, l) {
				t.Errorf("round trip:\n got %+v\nwant %+v", back, l)
			}
		})
	}
	// The proto must not alias the broker's metadata map.
	p := leaseToProto(full)
	p.Metadata["pod"] = "changed"
	if full.Metadata["pod"] != "a" {
		t.Error("leaseToProto aliases the metadata map")
	}
}

func TestStateMapping(t *testing.T) {
	for s := broker.StateUnspecified; s <= broker.StateRevokeFailed; s++ {
		back, ok := stateFromProto(stateToProto(s))
		if !ok || back != s {
			t.Errorf("state %v: round trip gave %v, %v", s, back, ok)
		}
	}
	// ISSUING is the store's: the API shows it as ACTIVE, and ACTIVE
	// asked for means ACTIVE (whose filter matches ISSUING leases too).
	if p := stateToProto(broker.StateIssuing); p != pb.LeaseState_LEASE_STATE_ACTIVE {
		t.Errorf("ISSUING is shown as %v, want ACTIVE", p)
	}
	if back, _ := stateFromProto(pb.LeaseState_LEASE_STATE_ACTIVE); back != broker.StateActive {
		t.Errorf("ACTIVE maps back to %v", back)
	}
	if _, ok := stateFromProto(pb.LeaseState(42)); ok {
		t.Error("state 42 accepted")
	}
	if _, ok := stateFromProto(pb.LeaseState(-1)); ok {
		t.Error("state -1 accepted")
	}
}

func TestCredentialDSN(t *testing.T) {
	c := broker.Credential{Username: "cb_ro_x", Password: "p@ss/w:rd%?#", Host: "127.0.0.1", Port: 5433, Database: "app db"}
	p := credentialToProto(c, "require")
	if p.GetPort() != 5433 || p.GetPassword() != c.Password || p.GetDatabase() != "app db" {
		t.Errorf("credential = %+v", p)
	}
	u, err := url.Parse(p.GetDsn())
	if err != nil {
		t.Fatalf("dsn %q does not parse: %v", p.GetDsn(), err)
	}
	pw, _ := u.User.Password()
	if u.Scheme != "postgres" || u.User.Username() != c.Username || pw != c.Password ||
		u.Hostname() != "127.0.0.1" || u.Port() != "5433" || strings.TrimPrefix(u.Path, "/") != "app db" ||
		u.Query().Get("sslmode") != "require" {
		t.Errorf("dsn %q parses to %+v", p.GetDsn(), u)
	}

	v6 := credentialDSN(broker.Credential{Username: "u", Password: "p", Host: "::1", Port: 5432, Database: "d"}, "prefer")
	if v6 != "postgres://u:p@[::1]:5432/d?sslmode=prefer" {
		t.Errorf("ipv6 dsn = %q", v6)
	}
}

func TestDurationFromProto(t *testing.T) {
	tests := []struct {
		name string
		in   *durationpb.Duration
		want time.Duration
		ok   bool
	}{
		{"nil is zero", nil, 0, true},
		{"zero", durationpb.New(0), 0, true},
		{"positive", durationpb.New(90 * time.Second), 90 * time.Second, true},
		{"negative", durationpb.New(-time.Second), 0, false},
		{"negative nanos", &durationpb.Duration{Nanos: -1}, 0, false},
		{"mixed signs", &durationpb.Duration{Seconds: 1, Nanos: -1}, 0, false},
		{"nanos out of range", &durationpb.Duration{Nanos: 1e9}, 0, false},
		{"beyond 10000 years", &durationpb.Duration{Seconds: 315576000001}, 0, false},
		// Valid proto, beyond time.Duration: saturates; the broker caps at max TTL.
		{"1000 years", &durationpb.Duration{Seconds: 1000 * 365 * 86400}, time.Duration(1<<63 - 1), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := durationFromProto(tc.in, "ttl")
			if tc.ok {
				if err != nil || got != tc.want {
					t.Errorf("got %v, %v; want %v", got, err, tc.want)
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), "ttl: ") {
				t.Errorf("got %v, %v; want InvalidArgument naming ttl", got, err)
			}
		})
	}
}

func TestPageToken(t *testing.T) {
	id := "abcdefghijklmnopqrstuvwxyz234567"
	got, err := decodePageToken(encodePageToken(id))
	if err != nil || got != id {
		t.Errorf("round trip = %q, %v", got, err)
	}
	if encodePageToken("") != "" {
		t.Error("empty id must give an empty token (last page)")
	}
	if got, err := decodePageToken(""); got != "" || err != nil {
		t.Errorf("empty token = %q, %v", got, err)
	}
	for _, tok := range []string{"!!!", "not base64 at all", encodePageToken("short"), encodePageToken("x'; DROP TABLE leases;--"), "YWJj\x00"} {
		if _, err := decodePageToken(tok); status.Code(err) != codes.InvalidArgument {
			t.Errorf("token %q: err = %v, want InvalidArgument", tok, err)
		}
	}
}
