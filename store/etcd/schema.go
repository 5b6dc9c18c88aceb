package etcd

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// The key layout. Everything that decides how keys and values are read is
// in this file. Every key is under the group's prefix P (Options.Prefix):
//
//	P lease/<id>                      -> lease record (JSON, leaseRecord)
//	P intent/<id>                     -> intent record (JSON, intentRecord)
//	P expiry/<hex16 due>/<id>         -> expiryValue (JSON); live leases only,
//	                                     due no later than the lease's
//	                                     (indexKey)
//	P tombstone/<hex16 end>/<id>      -> empty; terminal leases only
//	P lastissued/<role>               -> hex16 of the role's newest issue time
//	P group                           -> the broker group's id (GroupID)
//	P stream/<instance>/<id>          -> empty; a KeepAlive stream on that
//	                                     instance names the lease (feed.go);
//	                                     on the instance's session lease
//
// hex16 is the instant in unix nanoseconds as 16 lower-case hex digits: a
// fixed-width big-endian number, so byte order is time order (as bbolt's
// be64 keys), and etcdctl shows keys an operator can read. The id after
// the time keeps keys unique when two leases share an instant. Values are
// JSON for the same reason: `etcdctl get --prefix P` is the debugger.
//
// Lease.Revision is the lease key's mod revision, which etcd moves on
// every write of the key; the record does not hold it.
//
// Listing by role or client scans the lease keys and filters (there is no
// secondary index): a filtered listing reads every lease record, but a
// lease write stays at three operations of a Txn's 128 and the listing is
// an admin's call, not a hot path.

// Key sections under the prefix.
const (
	sectionLease      = "lease/"
	sectionIntent     = "intent/"
	sectionExpiry     = "expiry/"
	sectionTombstone  = "tombstone/"
	sectionLastIssued = "lastissued/"
	sectionStream     = "stream/"
	keyGroup          = "group"
)

// keys builds the keys of one broker group.
type keys struct{ prefix string }

func (k keys) lease(id string) string        { return k.prefix + sectionLease + id }
func (k keys) intent(id string) string       { return k.prefix + sectionIntent + id }
func (k keys) lastIssued(role string) string { return k.prefix + sectionLastIssued + role }
func (k keys) group() string                 { return k.prefix + keyGroup }
func (k keys) stream(instance, id string) string {
	return k.prefix + sectionStream + instance + "/" + id
}

// Keys of the group's members and its election (leader.go), attached to
// each brokerd's session lease, so they vanish with it:
//
//	P instance/<name>        -> memberValue (JSON)
//	P leader/<lease hex>     -> leaderValue (JSON); the election's keys,
//	                            the first created leads
const (
	sectionInstance = "instance/"
	electionPrefix  = "leader" // concurrency.NewElection appends "/"
)

func (k keys) instance(name string) string { return k.prefix + sectionInstance + name }
func (k keys) election() string            { return k.prefix + electionPrefix }
func (k keys) section(s string) string     { return k.prefix + s }

// leaseID returns the id of a lease key.
func (k keys) leaseID(key []byte) string { return string(key[len(k.prefix)+len(sectionLease):]) }

// timeKey is an expiry or tombstone key; n is unix nanoseconds, not
// negative.
func (k keys) timeKey(section string, n int64, id string) string {
	return k.section(section) + hex16(n) + "/" + id
}

// timeBound is the first key of section at instant n: every key of an
// earlier instant sorts before it.
func (k keys) timeBound(section string, n int64) string { return k.section(section) + hex16(n) }

var errCorrupt = errors.New("corrupt record")

// parseStream splits a stream mark's key into its instance and lease id.
func (k keys) parseStream(key []byte) (broker.StreamMark, bool) {
	rest, ok := strings.CutPrefix(string(key), k.section(sectionStream))
	if !ok {
		return broker.StreamMark{}, false
	}
	instance, id, ok := strings.Cut(rest, "/")
	if !ok || instance == "" || id == "" {
		return broker.StreamMark{}, false
	}
	return broker.StreamMark{Instance: instance, LeaseID: id}, true
}

// CheckInstance refuses an instance name a stream mark's key cannot hold:
// empty, or with a "/" (the key's separator), or longer than 253 bytes
// (a host name's limit).
func CheckInstance(name string) error {
	if name == "" || strings.Contains(name, "/") || len(name) > 253 {
		return fmt.Errorf("%w: instance name %q must be 1 to 253 bytes without \"/\"", broker.ErrInvalidArgument, name)
	}
	return nil
}

// parseTimeKey splits an expiry or tombstone key into its instant and id.
func (k keys) parseTimeKey(section string, key []byte) (int64, string, error) {
	rest, ok := strings.CutPrefix(string(key), k.section(section))
	if !ok || len(rest) < 18 || rest[16] != '/' {
		return 0, "", fmt.Errorf("%w: malformed index key %q", errCorrupt, key)
	}
	n, err := parseHex16(rest[:16])
	if err != nil {
		return 0, "", fmt.Errorf("%w: index key %q", err, key)
	}
	return n, rest[17:], nil
}

func hex16(n int64) string { return fmt.Sprintf("%016x", uint64(n)) }

func parseHex16(s string) (int64, error) {
	u, err := strconv.ParseUint(s, 16, 64)
	if err != nil || len(s) != 16 || u > math.MaxInt64 {
		return 0, fmt.Errorf("%w: malformed instant %q", errCorrupt, s)
	}
	return int64(u), nil
}

// indexKey is the one index key of a lease: in the expiry section while it
// is live, in the tombstone section at its EndTime once it is terminal.
//
// A live lease's expiry key is at the instant it needs attention (its
// ExpireTime, or its EndTime when set and earlier: an admin's revocation
// under way), or earlier: an update that moves that instant later and
// changes nothing the key's value holds (a renewal) leaves the key where
// it was and writes the record alone, one put where moving the key took
// three (the record, the old key's delete, the new key). So the expiry
// section is a lower bound of each live lease's attention instant, which
// is all its readers need (broker.LeaseStore.ScanExpiry): the expiry
// manager reads a lease before acting on it and queues it again when it
// was renewed, and a new leader takes the exact instants from the change
// feed, which carries every record. An update that moves the instant
// earlier, or changes the state, target, username or
// revoke_on_disconnect the value holds, or ends the lease, moves the key.
//
// The record names its key: leaseRecord.IndexDue is the key's instant
// when the key is not at the record's attention instant (a renewed
// lease), and 0 when it is; indexOf reads it, so every path that derives
// the key from the record (deletes, purges, the index cache) finds the
// one that exists.
type indexKey struct {
	key  string
	val  string
	due  int64 // the key's instant (expiry: its due; tombstone: the end)
	live bool  // in the expiry section
}

// attention is the instant a live lease needs attention.
func attention(r *leaseRecord) int64 {
	due := r.Expire
	if r.End != 0 && r.End < due {
		due = r.End
	}
	return due
}

// indexOf is the index key the record names (false: a state that has
// none).
func (k keys) indexOf(id string, r *leaseRecord) (indexKey, bool) {
	idx, ok := k.indexAt(id, r, attention(r))
	if ok && idx.live && r.IndexDue != 0 {
		idx.key, idx.due = k.timeKey(sectionExpiry, r.IndexDue, id), r.IndexDue
	}
	return idx, ok
}

// indexAt is the index key of the record with a live lease's key at
// instant due.
func (k keys) indexAt(id string, r *leaseRecord, due int64) (indexKey, bool) {
	switch st := broker.LeaseState(r.State); {
	case st.Live():
		v, _ := json.Marshal(expiryValue{State: r.State, Target: r.Target, Username: r.Username,
			RevokeOnDisconnect: r.RevokeOnDisconnect})
		return indexKey{key: k.timeKey(sectionExpiry, due, id), val: string(v), due: due, live: true}, true
	case st.Terminal():
		return indexKey{key: k.timeKey(sectionTombstone, r.End, id), due: r.End}, true
	default:
		return indexKey{}, false
	}
}

// placeIndex decides the index key of r, a new version of a lease whose
// stored version has index key old (hasOld false: none known), and sets
// r.IndexDue to name it: the old key when it still serves (both versions
// live, the same value, and the old instant no later than r's attention
// instant), else the key at r's attention instant.
func (k keys) placeIndex(id string, r *leaseRecord, old indexKey, hasOld bool) (indexKey, bool) {
	r.IndexDue = 0
	want, ok := k.indexAt(id, r, attention(r))
	if ok && hasOld && old.live && want.live && old.val == want.val && old.due < want.due {
		r.IndexDue = old.due
		return old, true
	}
	return want, ok
}

// recordFormat is the format of the lease and intent records this code
// writes; a reader refuses one it does not know, so an older binary cannot
// misread a newer record. Fields may be added without a new format.
const recordFormat = 1

// leaseRecord is a stored lease. Instants are unix nanoseconds (0: none),
// exact to the nanosecond, unlike RFC 3339 strings through time zones.
type leaseRecord struct {
	Format             int               `json:"format"`
	State              int               `json:"state"`
	Role               string            `json:"role,omitempty"`
	Client             string            `json:"client,omitempty"`
	Target             string            `json:"target,omitempty"`
	Username           string            `json:"username,omitempty"`
	ProxyRole          string            `json:"proxy_role,omitempty"`
	Issue              int64             `json:"issue_ns,omitempty"`
	Expire             int64             `json:"expire_ns,omitempty"`
	MaxExpire          int64             `json:"max_expire_ns,omitempty"`
	NextAttempt        int64             `json:"next_attempt_ns,omitempty"`
	End                int64             `json:"end_ns,omitempty"`
	RevokeAttempts     int               `json:"revoke_attempts,omitempty"`
	RevokeOnDisconnect bool              `json:"revoke_on_disconnect,omitempty"`
	ValidUntilBehind   bool              `json:"valid_until_behind,omitempty"`
	LastError          string            `json:"last_error,omitempty"`
	Metadata           map[string]string `json:"metadata,omitempty"`
	// IndexDue is the instant of the lease's expiry key when that is not
	// its attention instant (indexKey); 0 when it is.
	IndexDue int64 `json:"index_ns,omitempty"`
	// Usage is broker.LeaseUsage; absent until the lease was seen connected.
	Usage *usageRecord `json:"usage,omitempty"`
}

// expiryValue is the value of an expiry key: what start-up and
// reconciliation need of a live lease (broker.ExpiryEntry), so that they
// read the index and never the records.
type expiryValue struct {
	State              int    `json:"state"`
	Target             string `json:"target,omitempty"`
	Username           string `json:"username,omitempty"`
	RevokeOnDisconnect bool   `json:"revoke_on_disconnect,omitempty"`
}

type intentRecord struct {
	Format    int    `json:"format"`
	Target    string `json:"target,omitempty"`
	Username  string `json:"username,omitempty"`
	ProxyRole string `json:"proxy_role,omitempty"`
	Create    int64  `json:"create_ns,omitempty"`
	// Group is the broker group that wrote the intent (broker.Intent).
	Group string `json:"group,omitempty"`
}

// nanos is the stored form of a time broker.CheckStorable accepted.
func nanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func nanosTime(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// usageRecord is a lease's broker.LeaseUsage.
type usageRecord struct {
	Sessions        int    `json:"sessions,omitempty"`
	PeakSessions    int    `json:"peak_sessions,omitempty"`
	SessionsSeen    int    `json:"sessions_seen,omitempty"`
	FirstSeen       int64  `json:"first_seen_ns,omitempty"`
	LastSeen        int64  `json:"last_seen_ns,omitempty"`
	ApplicationName string `json:"application_name,omitempty"`
	ClientAddr      string `json:"client_addr,omitempty"`
	LastQueryStart  int64  `json:"last_query_start_ns,omitempty"`
}

func encodeUsage(u broker.LeaseUsage) *usageRecord {
	if u == (broker.LeaseUsage{}) {
		return nil
	}
	return &usageRecord{
		Sessions: u.Sessions, PeakSessions: u.PeakSessions, SessionsSeen: u.SessionsSeen,
		FirstSeen: nanos(u.FirstSeen), LastSeen: nanos(u.LastSeen),
		ApplicationName: u.ApplicationName, ClientAddr: u.ClientAddr, LastQueryStart: nanos(u.LastQueryStart),
	}
}

func (u *usageRecord) usage() broker.LeaseUsage {
	if u == nil {
		return broker.LeaseUsage{}
	}
	return broker.LeaseUsage{
		Sessions: u.Sessions, PeakSessions: u.PeakSessions, SessionsSeen: u.SessionsSeen,
		FirstSeen: nanosTime(u.FirstSeen), LastSeen: nanosTime(u.LastSeen),
		ApplicationName: u.ApplicationName, ClientAddr: u.ClientAddr, LastQueryStart: nanosTime(u.LastQueryStart),
	}
}

// encodeLease validates l (broker.CheckStorable) and returns its record
// and the record encoded.
func encodeLease(l *broker.Lease) (*leaseRecord, []byte, error) {
	r, err := recordOf(l)
	if err != nil {
		return nil, nil, err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return nil, nil, err
	}
	return r, b, nil
}

// recordOf validates l (broker.CheckStorable) and returns its record, not
// yet encoded: an update places the index key (placeIndex) first.
func recordOf(l *broker.Lease) (*leaseRecord, error) {
	if err := broker.CheckStorable(l); err != nil {
		return nil, err
	}
	return &leaseRecord{
		Format: recordFormat, State: int(l.State),
		Role: l.Role, Client: l.Client, Target: l.Target, Username: l.Username, ProxyRole: l.ProxyRole,
		Issue: nanos(l.IssueTime), Expire: nanos(l.ExpireTime), MaxExpire: nanos(l.MaxExpireTime),
		NextAttempt: nanos(l.NextAttempt), End: nanos(l.EndTime),
		RevokeAttempts: l.RevokeAttempts, RevokeOnDisconnect: l.RevokeOnDisconnect,
		ValidUntilBehind: l.ValidUntilBehind, LastError: l.LastError, Metadata: l.Metadata,
		Usage: encodeUsage(l.Usage),
	}, nil
}

func decodeRecord(id string, v []byte) (*leaseRecord, error) {
	var r leaseRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("lease %q: %w: %v", id, errCorrupt, err)
	}
	if r.Format != recordFormat {
		return nil, fmt.Errorf("lease %q: %w: unknown record format %d", id, errCorrupt, r.Format)
	}
	for _, n := range []int64{r.Issue, r.Expire, r.MaxExpire, r.NextAttempt, r.End, r.IndexDue} {
		if n < 0 {
			return nil, fmt.Errorf("lease %q: %w: negative instant", id, errCorrupt)
		}
	}
	if u := r.Usage; u != nil {
		if u.FirstSeen < 0 || u.LastSeen < 0 || u.LastQueryStart < 0 || u.Sessions < 0 || u.PeakSessions < 0 || u.SessionsSeen < 0 {
			return nil, fmt.Errorf("lease %q: %w: negative usage", id, errCorrupt)
		}
	}
	return &r, nil
}

// lease returns the record as a broker.Lease at revision rev; the metadata
// map is the record's own (decoded afresh per read), so the caller owns it.
func (r *leaseRecord) lease(id string, rev int64) broker.Lease {
	return broker.Lease{
		ID: id, State: broker.LeaseState(r.State),
		Role: r.Role, Client: r.Client, Target: r.Target, Username: r.Username, ProxyRole: r.ProxyRole,
		IssueTime: nanosTime(r.Issue), ExpireTime: nanosTime(r.Expire), MaxExpireTime: nanosTime(r.MaxExpire),
		NextAttempt: nanosTime(r.NextAttempt), EndTime: nanosTime(r.End),
		RevokeAttempts: r.RevokeAttempts, RevokeOnDisconnect: r.RevokeOnDisconnect,
		ValidUntilBehind: r.ValidUntilBehind, LastError: r.LastError, Metadata: r.Metadata,
		Usage:    r.Usage.usage(),
		Revision: uint64(rev),
	}
}

func decodeLease(id string, v []byte, rev int64) (broker.Lease, error) {
	r, err := decodeRecord(id, v)
	if err != nil {
		return broker.Lease{}, err
	}
	return r.lease(id, rev), nil
}

func decodeExpiry(id string, due int64, v []byte) (broker.ExpiryEntry, error) {
	var ev expiryValue
	if err := json.Unmarshal(v, &ev); err != nil {
		return broker.ExpiryEntry{}, fmt.Errorf("expiry entry %q: %w: %v", id, errCorrupt, err)
	}
	return broker.ExpiryEntry{
		Expire: nanosTime(due), LeaseID: id,
		State: broker.LeaseState(ev.State), Target: ev.Target, Username: ev.Username,
		RevokeOnDisconnect: ev.RevokeOnDisconnect,
	}, nil
}

func encodeIntent(in *broker.Intent) ([]byte, error) {
	if err := broker.CheckLeaseID(in.LeaseID); err != nil {
		return nil, err
	}
	created, err := broker.StorableTime(in.CreateTime)
	if err != nil {
		return nil, fmt.Errorf("intent %q: %w", in.LeaseID, err)
	}
	return json.Marshal(intentRecord{Format: recordFormat, Target: in.Target, Username: in.Username,
		ProxyRole: in.ProxyRole, Create: nanos(created), Group: in.Group})
}

func decodeIntent(id string, v []byte) (broker.Intent, error) {
	var r intentRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return broker.Intent{}, fmt.Errorf("intent %q: %w: %v", id, errCorrupt, err)
	}
	if r.Format != recordFormat || r.Create < 0 {
		return broker.Intent{}, fmt.Errorf("intent %q: %w: format %d", id, errCorrupt, r.Format)
	}
	return broker.Intent{LeaseID: id, Target: r.Target, Username: r.Username, ProxyRole: r.ProxyRole,
		CreateTime: nanosTime(r.Create), Group: r.Group}, nil
}
