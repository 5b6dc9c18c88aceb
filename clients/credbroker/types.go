package credbroker

import (
	"log/slog"
	"math/rand/v2"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// LeaseState is where a lease is in its lifecycle.
type LeaseState int32

const (
	StateUnspecified  = LeaseState(pb.LeaseState_LEASE_STATE_UNSPECIFIED)
	StateActive       = LeaseState(pb.LeaseState_LEASE_STATE_ACTIVE)
	StateRevoking     = LeaseState(pb.LeaseState_LEASE_STATE_REVOKING)
	StateRevoked      = LeaseState(pb.LeaseState_LEASE_STATE_REVOKED)
	StateExpired      = LeaseState(pb.LeaseState_LEASE_STATE_EXPIRED)
	StateRevokeFailed = LeaseState(pb.LeaseState_LEASE_STATE_REVOKE_FAILED)
)

func (s LeaseState) String() string { return pb.LeaseState(s).String() }

// Lease is an issued credential's lease.
type Lease struct {
	ID, Role, Client, Username, Target   string
	IssueTime, ExpireTime, MaxExpireTime time.Time
	EndTime                              time.Time
	State                                LeaseState
	Metadata                             map[string]string
	LastError                            string
	RevokeOnDisconnect                   bool
	// Usage is what the broker saw of the user's database sessions
	// (docs/usage.md); the zero value until a sample saw it connected.
	Usage LeaseUsage
}

// LeaseUsage is a lease's database-side usage, sampled by the broker from
// pg_stat_activity. ClientAddr and LastQueryStart need the broker to hold
// pg_read_all_stats.
type LeaseUsage struct {
	Sessions, PeakSessions, SessionsSeen int
	FirstSeen, LastSeen, LastQueryStart  time.Time
	ApplicationName, ClientAddr          string
}

// Credential is what a service logs in to PostgreSQL with.
type Credential struct {
	Username, Password, Host, Database string
	Port                               int
	// DSN is a postgres:// URL with the password in it: treat it as the
	// password.
	DSN string
}

// String hides the password.
func (c Credential) String() string {
	return "credential{username=" + c.Username + " host=" + c.Host + " database=" + c.Database + "}"
}

// LogValue keeps the password out of slog output.
func (c Credential) LogValue() slog.Value {
	return slog.GroupValue(slog.String("username", c.Username), slog.String("host", c.Host), slog.String("database", c.Database))
}

func leaseFromProto(p *pb.Lease) Lease {
	return Lease{
		ID: p.GetId(), Role: p.GetRole(), Client: p.GetClient(), Username: p.GetUsername(), Target: p.GetTarget(),
		IssueTime: timeOf(p.GetIssueTime()), ExpireTime: timeOf(p.GetExpireTime()), MaxExpireTime: timeOf(p.GetMaxExpireTime()),
		EndTime: timeOf(p.GetEndTime()), State: LeaseState(p.GetState()), Metadata: p.GetMetadata(),
		LastError: p.GetLastError(), RevokeOnDisconnect: p.GetRevokeOnDisconnect(),
		Usage: LeaseUsage{
			Sessions: int(p.GetUsage().GetSessions()), PeakSessions: int(p.GetUsage().GetPeakSessions()),
			SessionsSeen: int(p.GetUsage().GetSessionsSeen()),
			FirstSeen:    timeOf(p.GetUsage().GetFirstSeenTime()), LastSeen: timeOf(p.GetUsage().GetLastSeenTime()),
			LastQueryStart:  timeOf(p.GetUsage().GetLastQueryStartTime()),
			ApplicationName: p.GetUsage().GetApplicationName(), ClientAddr: p.GetUsage().GetClientAddr(),
		},
	}
}

func credentialFromProto(p *pb.Credential) Credential {
	return Credential{
		Username: p.GetUsername(), Password: p.GetPassword(), Host: p.GetHost(),
		Port: int(p.GetPort()), Database: p.GetDatabase(), DSN: p.GetDsn(),
	}
}

func timeOf(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}

// jitter is uniform in [0, d).
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(d)))
}
