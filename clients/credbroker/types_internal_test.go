package credbroker

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// TestLeaseUsageFromProto: the usage the broker reports reaches Lease,
// and a lease never seen connected has the zero usage.
func TestLeaseUsageFromProto(t *testing.T) {
	at := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	l := leaseFromProto(&pb.Lease{Id: "x", Usage: &pb.LeaseUsage{
		Sessions: 1, PeakSessions: 2, SessionsSeen: 3,
		FirstSeenTime: timestamppb.New(at), LastSeenTime: timestamppb.New(at.Add(time.Minute)),
		ApplicationName: "api", ClientAddr: "10.0.0.1", LastQueryStartTime: timestamppb.New(at.Add(59 * time.Second)),
	}})
	want := LeaseUsage{Sessions: 1, PeakSessions: 2, SessionsSeen: 3, FirstSeen: at, LastSeen: at.Add(time.Minute),
		LastQueryStart: at.Add(59 * time.Second), ApplicationName: "api", ClientAddr: "10.0.0.1"}
	if l.Usage != want {
		t.Errorf("usage %+v, want %+v", l.Usage, want)
	}
	if u := leaseFromProto(&pb.Lease{Id: "y"}).Usage; u != (LeaseUsage{}) {
		t.Errorf("usage of a lease never seen connected: %+v", u)
	}
}
