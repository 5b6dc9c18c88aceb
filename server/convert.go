package server

import (
	"encoding/base64"
	"fmt"
	"math"
	"net"
	"net/url"
	"strconv"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// Conversions between broker types and protobuf messages. They are total:
// any broker value converts, so a handler never fails after the broker has
// done its work (an issued credential must reach its caller).

func timestampOrNil(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func leaseToProto(l broker.Lease) *pb.Lease {
	out := &pb.Lease{
		Id:                 l.ID,
		Role:               l.Role,
		Client:             l.Client,
		Username:           l.Username,
		Target:             l.Target,
		IssueTime:          timestampOrNil(l.IssueTime),
		ExpireTime:         timestampOrNil(l.ExpireTime),
		MaxExpireTime:      timestampOrNil(l.MaxExpireTime),
		State:              stateToProto(l.State),
		LastError:          l.LastError,
		EndTime:            timestampOrNil(l.EndTime),
		RevokeOnDisconnect: l.RevokeOnDisconnect,
		Usage:              usageToProto(l.Usage),
	}
	if len(l.Metadata) > 0 {
		out.Metadata = make(map[string]string, len(l.Metadata))
		for k, v := range l.Metadata {
			out.Metadata[k] = v
		}
	}
	return out
}

// usageToProto is nil for a lease never sampled connected. Counts are
// bounded to int32 by the store (broker.CheckStorable).
func usageToProto(u broker.LeaseUsage) *pb.LeaseUsage {
	if u == (broker.LeaseUsage{}) {
		return nil
	}
	return &pb.LeaseUsage{
		Sessions:           clampInt32(u.Sessions),
		PeakSessions:       clampInt32(u.PeakSessions),
		SessionsSeen:       clampInt32(u.SessionsSeen),
		FirstSeenTime:      timestampOrNil(u.FirstSeen),
		LastSeenTime:       timestampOrNil(u.LastSeen),
		ApplicationName:    u.ApplicationName,
		ClientAddr:         u.ClientAddr,
		LastQueryStartTime: timestampOrNil(u.LastQueryStart),
	}
}

func usageFromProto(p *pb.LeaseUsage) broker.LeaseUsage {
	if p == nil {
		return broker.LeaseUsage{}
	}
	return broker.LeaseUsage{
		Sessions:        int(p.GetSessions()),
		PeakSessions:    int(p.GetPeakSessions()),
		SessionsSeen:    int(p.GetSessionsSeen()),
		FirstSeen:       timeOrZero(p.GetFirstSeenTime()),
		LastSeen:        timeOrZero(p.GetLastSeenTime()),
		ApplicationName: p.GetApplicationName(),
		ClientAddr:      p.GetClientAddr(),
		LastQueryStart:  timeOrZero(p.GetLastQueryStartTime()),
	}
}

func clampInt32(n int) int32 {
	return int32(min(max(n, math.MinInt32), math.MaxInt32))
}

// leaseFromProto is the inverse of leaseToProto for the fields the API
// carries (the broker's bookkeeping fields, such as Revision, stay zero).
func leaseFromProto(p *pb.Lease) broker.Lease {
	l := broker.Lease{
		ID:                 p.GetId(),
		Role:               p.GetRole(),
		Client:             p.GetClient(),
		Username:           p.GetUsername(),
		Target:             p.GetTarget(),
		LastError:          p.GetLastError(),
		RevokeOnDisconnect: p.GetRevokeOnDisconnect(),
	}
	// An unknown state becomes StateUnspecified (the zero value).
	l.State, _ = stateFromProto(p.GetState())
	l.IssueTime = timeOrZero(p.GetIssueTime())
	l.ExpireTime = timeOrZero(p.GetExpireTime())
	l.MaxExpireTime = timeOrZero(p.GetMaxExpireTime())
	l.EndTime = timeOrZero(p.GetEndTime())
	l.Usage = usageFromProto(p.GetUsage())
	if len(p.GetMetadata()) > 0 {
		l.Metadata = make(map[string]string, len(p.GetMetadata()))
		for k, v := range p.GetMetadata() {
			l.Metadata[k] = v
		}
	}
	return l
}

func timeOrZero(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}

// The two enums are kept apart on purpose (the broker does not import the
// proto), so the mapping is spelled out rather than a numeric cast.
var stateMap = []struct {
	b broker.LeaseState
	p pb.LeaseState
}{
	{broker.StateUnspecified, pb.LeaseState_LEASE_STATE_UNSPECIFIED},
	{broker.StateActive, pb.LeaseState_LEASE_STATE_ACTIVE},
	{broker.StateRevoking, pb.LeaseState_LEASE_STATE_REVOKING},
	{broker.StateRevoked, pb.LeaseState_LEASE_STATE_REVOKED},
	{broker.StateExpired, pb.LeaseState_LEASE_STATE_EXPIRED},
	{broker.StateRevokeFailed, pb.LeaseState_LEASE_STATE_REVOKE_FAILED},
	// Shown as ACTIVE (broker.LeaseState.Public); after ACTIVE's own entry,
	// so the mapping from the proto still finds StateActive first.
	{broker.StateIssuing, pb.LeaseState_LEASE_STATE_ACTIVE},
}

func stateToProto(s broker.LeaseState) pb.LeaseState {
	for _, m := range stateMap {
		if m.b == s {
			return m.p
		}
	}
	return pb.LeaseState_LEASE_STATE_UNSPECIFIED
}

// stateFromProto returns false for a value outside the enum (proto3 enums
// are open: a client may send any int32).
func stateFromProto(s pb.LeaseState) (broker.LeaseState, bool) {
	for _, m := range stateMap {
		if m.p == s {
			return m.b, true
		}
	}
	return broker.StateUnspecified, false
}

func roleToProto(r broker.Role, endpoints map[string]broker.Endpoint) *pb.Role {
	return &pb.Role{
		Name:       r.Name,
		Target:     r.Target,
		ProxyRole:  r.ProxyRole,
		DefaultTtl: durationpb.New(r.DefaultTTL),
		MaxTtl:     durationpb.New(r.MaxTTL),
		// Empty when the wiring did not say where the target is; the role
		// is still usable, the caller just learns the database at issue.
		Database: endpoints[r.Target].Database,
	}
}

func credentialToProto(c broker.Credential, sslmode string) *pb.Credential {
	port := int32(0)
	if c.Port > 0 && c.Port <= math.MaxUint16 {
		port = int32(c.Port)
	}
	return &pb.Credential{
		Username: c.Username,
		Password: c.Password,
		Host:     c.Host,
		Port:     port,
		Database: c.Database,
		Dsn:      credentialDSN(c, sslmode),
	}
}

// credentialDSN builds a libpq connection URI. net/url escapes the user,
// password and database, so a password with '@', '/' or '%' in it survives
// the round trip through any libpq-compatible parser.
func credentialDSN(c broker.Credential, sslmode string) string {
	host := c.Host
	if c.Port > 0 && c.Port <= math.MaxUint16 {
		host = net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
	} else if net.ParseIP(host) != nil && net.ParseIP(host).To4() == nil {
		host = "[" + host + "]" // a bare IPv6 address needs its brackets
	}
	u := url.URL{
		Scheme: "postgres",
		User:   url.UserPassword(c.Username, c.Password),
		Host:   host,
	}
	if c.Database != "" {
		u.Path = "/" + c.Database
	}
	if sslmode != "" {
		u.RawQuery = url.Values{"sslmode": {sslmode}}.Encode()
	}
	return u.String()
}

// durationFromProto validates an optional proto Duration: nil is zero,
// an out-of-range or sign-inconsistent value and a negative one are
// invalid. field names the request field in the error.
func durationFromProto(d *durationpb.Duration, field string) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, invalidArgument(fmt.Sprintf("%s: %v", field, err))
	}
	if d.GetSeconds() < 0 || d.GetNanos() < 0 {
		return 0, invalidArgument(fmt.Sprintf("%s: must not be negative", field))
	}
	// CheckValid accepts ±10000 years; time.Duration holds ±292 years.
	// AsDuration saturates, which for a TTL means "as long as allowed"
	// and the broker caps it at the role's max TTL anyway.
	return d.AsDuration(), nil
}

// Page tokens are the base64url of the last lease id of the previous page:
// opaque to callers, so the listing order can change without breaking them.
func encodePageToken(afterID string) string {
	if afterID == "" {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString([]byte(afterID))
}

func decodePageToken(tok string) (string, error) {
	if tok == "" {
		return "", nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || broker.ValidateLeaseID(string(raw)) != nil {
		return "", invalidArgument("invalid page_token")
	}
	return string(raw), nil
}
