package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"

	"github.com/credbroker/credbroker/broker"
)

// Records are a small hand-rolled binary format rather than JSON or gob: the
// expiry manager and listings read many of them, the file should stay small,
// and a fixed field order lets hot paths decode only the leading fields.
//
// Every record starts with a format byte. A reader rejects formats it does
// not know and ignores bytes after the fields it knows, so a later format can
// append fields. Neither record holds a secret: a lease never carries the
// password, only what revocation needs.
//
// Lease record, format 1 (uvarint/varint as in encoding/binary; str is a
// uvarint length then bytes; times are uvarint unix nanoseconds, 0 = zero):
//
//	byte    format (1)
//	uvarint state
//	uvarint revision
//	uvarint expire time     \  the "head": enough for CAS and index upkeep
//	uvarint end time        /
//	str     role            \  enough to filter listings
//	str     client          /
//	str     target, username, proxy role
//	uvarint issue time, max expire time, next attempt
//	varint  revoke attempts
//	byte    flags (bit 0: revoke on disconnect; bit 1: VALID UNTIL behind)
//	str     last error
//	uvarint metadata count, then str key, str value, sorted by key
//	then, only when the lease's usage is not the zero value, the usage
//	as one str holding:
//	  byte    usage format (1)
//	  uvarint sessions, peak sessions, sessions seen
//	  uvarint first seen, last seen, last query start (times)
//	  str     application name, client address
//
// The usage came later; it is trailing and optional, as the intent's
// group is, so a binary from before it reads the record (ignoring it)
// and a record without it decodes with zero usage. It is length-prefixed,
// so that what a later binary appends after it, or inside it after these
// fields, is skipped; a usage format this binary does not know reads as
// zero usage (sampling fills it again) rather than a corrupt lease.
//
// Intent record, format 1: byte format (1), str target, str username,
// str proxy role, uvarint create time, then optionally str group. The
// group came later; it is trailing and optional rather than a format 2
// so that a binary from before it still reads the record (ignoring the
// group, as it ignored groups altogether), and a record without it
// decodes with Group "".
const (
	leaseFormat1  byte = 1
	intentFormat1 byte = 1
	expiryFormat1 byte = 1
	usageFormat1  byte = 1

	flagRevokeOnDisconnect byte = 1 << 0
	flagValidUntilBehind   byte = 1 << 1
)

// errCorrupt marks a record or key that cannot be decoded. It is not a
// broker sentinel on purpose: the server reports it as an internal error.
var errCorrupt = errors.New("corrupt record")

// leaseHead is the leading part of a lease record. role and client alias the
// record bytes, so a leaseHead is only valid inside the transaction that read
// it.
type leaseHead struct {
	state    broker.LeaseState
	revision uint64
	expire   int64
	end      int64
	role     []byte
	client   []byte
	// expiryVal is the expiry index value of a live lease (see
	// encodeExpiryValue); set by encodeLease only, so only heads of records
	// about to be written carry it.
	expiryVal []byte
}

func (h *leaseHead) index(id string) (indexEntry, bool) {
	e, ok := indexOf(id, h.state, h.expire, h.end)
	if ok && h.state.Live() {
		e.val = h.expiryVal
	}
	return e, ok
}

func (h *leaseHead) matches(f *broker.LeaseFilter) bool {
	// string(b) == s does not allocate.
	return (f.Role == "" || string(h.role) == f.Role) &&
		(f.Client == "" || string(h.client) == f.Client) &&
		(f.State == broker.StateUnspecified || h.state == f.State || f.State == broker.StateActive && h.state == broker.StateIssuing)
}

// encodeLease validates l and returns its record and head. The revision
// written is l.Revision; callers set it first.
func encodeLease(l *broker.Lease) ([]byte, leaseHead, error) {
	if err := broker.CheckStorable(l); err != nil {
		return nil, leaseHead{}, err
	}
	// Checked above: the conversions cannot fail.
	issue, _ := timeNanos(l.IssueTime)
	expire, _ := timeNanos(l.ExpireTime)
	maxExpire, _ := timeNanos(l.MaxExpireTime)
	next, _ := timeNanos(l.NextAttempt)
	end, _ := timeNanos(l.EndTime)

	// Sized for the worst case, so encoding allocates once.
	const fixedMax = 3 + 18*binary.MaxVarintLen64 // formats, flags, numbers, string lengths
	size := fixedMax + len(l.Role) + len(l.Client) + len(l.Target) + len(l.Username) + len(l.ProxyRole) + len(l.LastError) +
		len(l.Usage.ApplicationName) + len(l.Usage.ClientAddr) + 1 + 9*binary.MaxVarintLen64
	for k, v := range l.Metadata {
		size += len(k) + len(v) + 2*binary.MaxVarintLen64
	}
	b := make([]byte, 0, size)
	b = append(b, leaseFormat1)
	b = binary.AppendUvarint(b, uint64(l.State))
	b = binary.AppendUvarint(b, l.Revision)
	b = binary.AppendUvarint(b, uint64(expire))
	b = binary.AppendUvarint(b, uint64(end))
	b = appendString(b, l.Role)
	b = appendString(b, l.Client)
	b = appendString(b, l.Target)
	b = appendString(b, l.Username)
	b = appendString(b, l.ProxyRole)
	b = binary.AppendUvarint(b, uint64(issue))
	b = binary.AppendUvarint(b, uint64(maxExpire))
	b = binary.AppendUvarint(b, uint64(next))
	b = binary.AppendVarint(b, int64(l.RevokeAttempts))
	var flags byte
	if l.RevokeOnDisconnect {
		flags |= flagRevokeOnDisconnect
	}
	if l.ValidUntilBehind {
		flags |= flagValidUntilBehind
	}
	b = append(b, flags)
	b = appendString(b, l.LastError)
	// Sorted so that equal leases encode to equal bytes.
	b = binary.AppendUvarint(b, uint64(len(l.Metadata)))
	for _, k := range slices.Sorted(maps.Keys(l.Metadata)) {
		b = appendString(b, k)
		b = appendString(b, l.Metadata[k])
	}
	if u := l.Usage; u != (broker.LeaseUsage{}) {
		first, _ := timeNanos(u.FirstSeen)
		last, _ := timeNanos(u.LastSeen)
		query, _ := timeNanos(u.LastQueryStart)
		ub := make([]byte, 0, 1+8*binary.MaxVarintLen64+len(u.ApplicationName)+len(u.ClientAddr))
		ub = append(ub, usageFormat1)
		ub = binary.AppendUvarint(ub, uint64(u.Sessions))
		ub = binary.AppendUvarint(ub, uint64(u.PeakSessions))
		ub = binary.AppendUvarint(ub, uint64(u.SessionsSeen))
		ub = binary.AppendUvarint(ub, uint64(first))
		ub = binary.AppendUvarint(ub, uint64(last))
		ub = binary.AppendUvarint(ub, uint64(query))
		ub = appendString(ub, u.ApplicationName)
		ub = appendString(ub, u.ClientAddr)
		b = binary.AppendUvarint(b, uint64(len(ub)))
		b = append(b, ub...)
	}

	head := leaseHead{
		state:    l.State,
		revision: l.Revision,
		expire:   expire,
		end:      end,
	}
	if l.State.Live() {
		head.expiryVal = encodeExpiryValue(l.State, flags, l.Target, l.Username)
	}
	return b, head, nil
}

// encodeExpiryValue is the value of a live lease's expiry index entry,
// format 1: byte format (1), uvarint state, byte flags (as in the lease
// record), str target, str username. It is what start-up and
// reconciliation need of every live lease (broker.ExpiryEntry), so they
// read the small index and never the records, most of which are
// tombstones in a large store. Entries written before the index had
// values are empty; ScanExpiry reports them without the details.
func encodeExpiryValue(state broker.LeaseState, flags byte, target, username string) []byte {
	b := make([]byte, 0, 3+2*binary.MaxVarintLen64+len(target)+len(username))
	b = append(b, expiryFormat1)
	b = binary.AppendUvarint(b, uint64(state))
	b = append(b, flags)
	b = appendString(b, target)
	return appendString(b, username)
}

// decodeExpiryValue fills e's details from an expiry index value; an empty
// value leaves them unset.
func decodeExpiryValue(v []byte, e *broker.ExpiryEntry) error {
	if len(v) == 0 {
		return nil
	}
	r := recordReader{b: v}
	if format := r.byte("format"); r.err == nil && format != expiryFormat1 {
		return fmt.Errorf("%w: unknown expiry index value format %d", errCorrupt, format)
	}
	state := r.uvarint("state")
	if state > math.MaxInt16 {
		r.fail("state")
	}
	flags := r.byte("flags")
	target := r.string("target")
	username := r.string("username")
	if r.err != nil {
		return r.err
	}
	e.State = broker.LeaseState(state)
	e.RevokeOnDisconnect = flags&flagRevokeOnDisconnect != 0
	e.Target, e.Username = target, username
	return nil
}

// decodeLeaseHead reads the head of a lease record and returns a reader
// positioned after it, for decodeLeaseRest.
func decodeLeaseHead(v []byte) (leaseHead, recordReader, error) {
	r := recordReader{b: v}
	var h leaseHead
	if format := r.byte("format"); r.err == nil && format != leaseFormat1 {
		return h, r, fmt.Errorf("%w: unknown lease record format %d", errCorrupt, format)
	}
	state := r.uvarint("state")
	if state > math.MaxInt16 {
		r.fail("state")
	}
	h.state = broker.LeaseState(state)
	h.revision = r.uvarint("revision")
	h.expire = r.nanos("expire time")
	h.end = r.nanos("end time")
	h.role = r.bytes("role")
	h.client = r.bytes("client")
	return h, r, r.err
}

// decodeLease decodes a whole record. Every string is copied, so the lease
// outlives the transaction.
func decodeLease(id string, v []byte) (broker.Lease, error) {
	h, r, err := decodeLeaseHead(v)
	if err != nil {
		return broker.Lease{}, fmt.Errorf("lease %q: %w", id, err)
	}
	l := broker.Lease{
		ID:         id,
		State:      h.state,
		Revision:   h.revision,
		ExpireTime: nanosTime(h.expire),
		EndTime:    nanosTime(h.end),
		Role:       string(h.role),
		Client:     string(h.client),
	}
	l.Target = r.string("target")
	l.Username = r.string("username")
	l.ProxyRole = r.string("proxy role")
	l.IssueTime = nanosTime(r.nanos("issue time"))
	l.MaxExpireTime = nanosTime(r.nanos("max expire time"))
	l.NextAttempt = nanosTime(r.nanos("next attempt"))
	attempts := r.varint("revoke attempts")
	if attempts < 0 || attempts > math.MaxInt32 {
		r.fail("revoke attempts")
	}
	l.RevokeAttempts = int(attempts)
	flags := r.byte("flags")
	l.RevokeOnDisconnect = flags&flagRevokeOnDisconnect != 0
	l.ValidUntilBehind = flags&flagValidUntilBehind != 0
	l.LastError = r.string("last error")
	n := r.uvarint("metadata count")
	// Each pair takes at least two bytes; a larger count is corruption, and
	// checking first keeps a bad count from allocating a huge map.
	if n > uint64(len(r.b)/2) {
		r.fail("metadata count")
	}
	if r.err == nil && n > 0 {
		l.Metadata = make(map[string]string, n)
		for range n {
			k := r.string("metadata key")
			l.Metadata[k] = r.string("metadata value")
		}
	}
	if r.err == nil && len(r.b) > 0 {
		ur := recordReader{b: r.bytes("usage")}
		if r.err == nil && len(ur.b) > 0 && ur.b[0] == usageFormat1 {
			ur.b = ur.b[1:]
			l.Usage.Sessions = ur.count("sessions")
			l.Usage.PeakSessions = ur.count("peak sessions")
			l.Usage.SessionsSeen = ur.count("sessions seen")
			l.Usage.FirstSeen = nanosTime(ur.nanos("first seen"))
			l.Usage.LastSeen = nanosTime(ur.nanos("last seen"))
			l.Usage.LastQueryStart = nanosTime(ur.nanos("last query start"))
			l.Usage.ApplicationName = ur.string("application name")
			l.Usage.ClientAddr = ur.string("client address")
			r.err = ur.err
		}
	}
	if r.err != nil {
		return broker.Lease{}, fmt.Errorf("lease %q: %w", id, r.err)
	}
	return l, nil
}

func encodeIntent(in *broker.Intent) ([]byte, error) {
	if err := broker.CheckLeaseID(in.LeaseID); err != nil {
		return nil, err
	}
	created, err := timeNanos(in.CreateTime)
	if err != nil {
		return nil, fmt.Errorf("intent %q: %w", in.LeaseID, err)
	}
	b := make([]byte, 0, 1+len(in.Target)+len(in.Username)+len(in.ProxyRole)+len(in.Group)+5*binary.MaxVarintLen64)
	b = append(b, intentFormat1)
	b = appendString(b, in.Target)
	b = appendString(b, in.Username)
	b = appendString(b, in.ProxyRole)
	b = binary.AppendUvarint(b, uint64(created))
	if in.Group != "" {
		b = appendString(b, in.Group)
	}
	return b, nil
}

func decodeIntent(id string, v []byte) (broker.Intent, error) {
	r := recordReader{b: v}
	if format := r.byte("format"); r.err == nil && format != intentFormat1 {
		return broker.Intent{}, fmt.Errorf("intent %q: %w: unknown intent record format %d", id, errCorrupt, format)
	}
	in := broker.Intent{LeaseID: id}
	in.Target = r.string("target")
	in.Username = r.string("username")
	in.ProxyRole = r.string("proxy role")
	in.CreateTime = nanosTime(r.nanos("create time"))
	if r.err == nil && len(r.b) > 0 {
		in.Group = r.string("group")
	}
	if r.err != nil {
		return broker.Intent{}, fmt.Errorf("intent %q: %w", id, r.err)
	}
	return in, nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// recordReader decodes fields in order. The first failure sticks and every
// later read returns a zero value, so decoders check err once at the end and
// never index past the buffer.
type recordReader struct {
	b   []byte
	err error
}

func (r *recordReader) fail(field string) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: truncated or malformed %s", errCorrupt, field)
	}
	r.b = nil
}

func (r *recordReader) byte(field string) byte {
	if r.err != nil || len(r.b) == 0 {
		r.fail(field)
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *recordReader) uvarint(field string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail(field)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *recordReader) varint(field string) int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail(field)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *recordReader) nanos(field string) int64 {
	v := r.uvarint(field)
	if v > math.MaxInt64 {
		r.fail(field)
		return 0
	}
	return int64(v)
}

// count reads a count that CheckStorable bounded to int32.
func (r *recordReader) count(field string) int {
	v := r.uvarint(field)
	if v > math.MaxInt32 {
		r.fail(field)
		return 0
	}
	return int(v)
}

// bytes returns a field that aliases the record.
func (r *recordReader) bytes(field string) []byte {
	n := r.uvarint(field)
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.fail(field)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *recordReader) string(field string) string { return string(r.bytes(field)) }
