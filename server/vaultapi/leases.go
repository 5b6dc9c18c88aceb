package vaultapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server"
)

// Lease ids. A Vault lease id is the path the secret was read from plus a
// unique suffix; credbroker's is <mount>/creds/<role>/<credbroker lease
// id>. The role segment is what revoke-prefix and LIST select by, and
// must be the lease's own role wherever a whole lease id is given; the
// last segment is the lease the broker knows.

// vaultLeaseID is the Vault lease id of a credbroker lease.
func (h *Handler) vaultLeaseID(role, id string) string {
	return h.cfg.Mount + "/creds/" + role + "/" + id
}

// errMalformedLease answers a lease id that is not one this mount issues.
var errMalformedLease = errors.New("invalid lease id: want " + "<mount>/creds/<role>/<lease id>" + " as the creds endpoint returned it")

// parseLeaseID splits a Vault lease id into its role and credbroker lease
// id, checking both as the broker would.
func (h *Handler) parseLeaseID(s string) (role, id string, err error) {
	rest, ok := strings.CutPrefix(s, h.cfg.Mount+"/creds/")
	if !ok {
		return "", "", errMalformedLease
	}
	role, id, ok = strings.Cut(rest, "/")
	if !ok || broker.ValidateRoleName(role) != nil || broker.ValidateLeaseID(id) != nil {
		return "", "", errMalformedLease
	}
	return role, id, nil
}

// leaseBody is the body of sys/leases/{lookup,renew,revoke}.
type leaseBody struct {
	LeaseID   string          `json:"lease_id"`
	Increment json.RawMessage `json:"increment"`
	// Sync is accepted and ignored: credbroker's revocation always
	// returns once the user is gone.
	Sync json.RawMessage `json:"sync"`
}

// leaseArg reads the lease id from the body or, for the paths that take
// one (sys/leases/renew/<id>, sys/renew/<id>, ...), the URL: Vault takes
// either, the URL's first. It answers the request on failure.
func (h *Handler) leaseArg(req *request, prefixes ...string) (leaseBody, string, string, bool) {
	var b leaseBody
	if !req.body(&b) {
		return b, "", "", false
	}
	for _, p := range prefixes {
		if rest, ok := strings.CutPrefix(req.path, p); ok && rest != "" {
			b.LeaseID = rest
		}
	}
	if b.LeaseID == "" {
		writeErrors(req.w, http.StatusBadRequest, "missing lease_id")
		return b, "", "", false
	}
	role, id, err := h.parseLeaseID(b.LeaseID)
	if err != nil {
		writeErrors(req.w, http.StatusBadRequest, err.Error())
		return b, "", "", false
	}
	return b, role, id, true
}

// parseIncrement reads Vault's increment: seconds as a number or a
// string, or a duration string ("1h"). Absent is zero (the role's
// default TTL).
func parseIncrement(raw json.RawMessage) (time.Duration, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return 0, nil
	}
	var n json.Number
	var s string
	switch {
	case json.Unmarshal(raw, &n) == nil:
		s = n.String()
	case json.Unmarshal(raw, &s) == nil:
	default:
		return 0, errors.New("increment: want seconds or a duration such as \"1h\"")
	}
	s = strings.TrimSpace(s)
	var d time.Duration
	if secs, err := strconv.ParseFloat(s, 64); err == nil {
		if math.IsNaN(secs) || math.IsInf(secs, 0) || secs > float64(math.MaxInt64/int64(time.Second)) {
			return 0, errors.New("increment: out of range")
		}
		d = time.Duration(secs * float64(time.Second))
	} else if d, err = time.ParseDuration(s); err != nil {
		return 0, errors.New("increment: want seconds or a duration such as \"1h\"")
	}
	if d < 0 {
		return 0, errors.New("increment: must not be negative")
	}
	return d, nil
}

// seconds is a lease's time left in whole seconds, truncated as Vault
// truncates a lookup's ttl: a client never believes it has more time
// than it has.
func seconds(until time.Time) int64 {
	d := time.Until(until)
	if d <= 0 {
		return 0
	}
	return int64(d / time.Second)
}

// renewedSeconds is a renewal's lease_duration. Vault answers the TTL it
// granted (an increment of 2 reads 2, not the 1.99 seconds left by the
// time the answer is written), which the Go client's LifetimeWatcher
// plans its next renewal from: truncating would make a short lease look
// as if renewals no longer extended it, and the watcher give up. Once
// the lease is capped at its max TTL, it is the time left, truncated, so
// a watcher reports done before the lease ends.
func renewedSeconds(l *pb.Lease) int64 {
	exp := l.GetExpireTime().AsTime()
	if !exp.Before(l.GetMaxExpireTime().AsTime()) {
		return seconds(exp)
	}
	d := time.Until(exp)
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second/2) / time.Second)
}

// live says whether a lease still exists as Vault sees leases: revoked
// and expired leases are gone from Vault, credbroker keeps their
// tombstones for its audit.
func live(l *pb.Lease) bool {
	switch l.GetState() {
	case pb.LeaseState_LEASE_STATE_REVOKED, pb.LeaseState_LEASE_STATE_EXPIRED:
		return false
	}
	return true
}

// lookup is PUT sys/leases/lookup.
func (h *Handler) lookup(req *request) {
	_, role, id, ok := h.leaseArg(req)
	if !ok {
		return
	}
	resp, err := h.creds.LookupLease(server.WithLeaseRole(req.ctx, role), &pb.LookupLeaseRequest{LeaseId: id})
	if status.Code(err) == codes.NotFound || (err == nil && !live(resp.GetLease())) {
		// Vault's answer for a lease it does not have.
		writeErrors(req.w, http.StatusBadRequest, "invalid lease")
		return
	}
	if err != nil {
		writeCallError(req.w, err)
		return
	}
	l := resp.GetLease()
	s := newSecret()
	s.Data = map[string]any{
		"id":           h.vaultLeaseID(l.GetRole(), l.GetId()),
		"issue_time":   l.GetIssueTime().AsTime().Format(time.RFC3339Nano),
		"expire_time":  l.GetExpireTime().AsTime().Format(time.RFC3339Nano),
		"last_renewal": nil,
		"renewable":    l.GetState() == pb.LeaseState_LEASE_STATE_ACTIVE,
		"ttl":          seconds(l.GetExpireTime().AsTime()),
		// credbroker's own, beside Vault's fields.
		"max_expire_time": l.GetMaxExpireTime().AsTime().Format(time.RFC3339Nano),
		"state":           strings.ToLower(strings.TrimPrefix(l.GetState().String(), "LEASE_STATE_")),
		"username":        l.GetUsername(),
	}
	writeJSON(req.w, http.StatusOK, s)
}

// renew is PUT sys/leases/renew (and sys/renew, with the lease id in the
// body or the URL).
func (h *Handler) renew(req *request) {
	b, role, id, ok := h.leaseArg(req, "sys/leases/renew/", "sys/renew/")
	if !ok {
		return
	}
	inc, err := parseIncrement(b.Increment)
	if err != nil {
		writeErrors(req.w, http.StatusBadRequest, err.Error())
		return
	}
	// The role segment must be the lease's own (server.WithLeaseRole):
	// under another role the id is one Vault never issued, answered as an
	// unknown lease, and nothing is renewed.
	resp, err := h.creds.RenewLease(server.WithLeaseRole(req.ctx, role), &pb.RenewLeaseRequest{LeaseId: id, Increment: durationpb.New(inc)})
	switch status.Code(err) {
	case codes.OK:
	case codes.NotFound, codes.FailedPrecondition:
		// Vault has no lease once it is revoked or expired: "lease not
		// found" for all three. The broker's message says which.
		writeErrors(req.w, http.StatusBadRequest, "lease not found", status.Convert(err).Message())
		return
	default:
		writeCallError(req.w, err)
		return
	}
	l := resp.GetLease()
	s := newSecret()
	s.LeaseID = h.vaultLeaseID(role, l.GetId())
	s.Renewable = l.GetState() == pb.LeaseState_LEASE_STATE_ACTIVE
	s.LeaseDuration = renewedSeconds(l)
	if exp, max := l.GetExpireTime().AsTime(), l.GetMaxExpireTime().AsTime(); inc > 0 && !exp.Before(max) && time.Now().Add(inc).After(max) {
		s.Warnings = append(s.Warnings, fmt.Sprintf("TTL of %q exceeded the effective max_ttl; TTL value is capped accordingly (the lease ends at %s)",
			inc.String(), l.GetMaxExpireTime().AsTime().UTC().Format(time.RFC3339)))
	}
	writeJSON(req.w, http.StatusOK, s)
}

// revoke is PUT sys/leases/revoke (and sys/revoke/<lease id>). It returns
// once the PostgreSQL user is gone and its sessions are ended.
func (h *Handler) revoke(req *request) {
	_, role, id, ok := h.leaseArg(req, "sys/leases/revoke/", "sys/revoke/")
	if !ok {
		return
	}
	// A lease id under another role than the lease's is an unknown lease
	// (server.WithLeaseRole): 204, and the lease is not revoked.
	_, err := h.creds.RevokeLease(server.WithLeaseRole(req.ctx, role), &pb.RevokeLeaseRequest{LeaseId: id})
	if err != nil && status.Code(err) != codes.NotFound {
		writeCallError(req.w, err)
		return
	}
	// Vault answers 204 for a lease it does not have, too: revoking is
	// idempotent.
	req.w.WriteHeader(http.StatusNoContent)
}

// revokePrefix is PUT sys/leases/revoke-prefix/<prefix> (admin): every
// lease of a role (<mount>/creds/<role>), or one lease
// (<mount>/creds/<role>/<id>). Wider prefixes are refused: credbroker
// never revokes "everything" on one request.
func (h *Handler) revokePrefix(req *request) {
	var ignored leaseBody
	if !req.body(&ignored) {
		return
	}
	prefix := strings.TrimPrefix(strings.TrimPrefix(req.path, "sys/leases/revoke-prefix/"), "sys/revoke-prefix/")
	rest, ok := strings.CutPrefix(prefix, h.cfg.Mount+"/creds/")
	role, id, hasID := strings.Cut(rest, "/")
	switch {
	case !ok || broker.ValidateRoleName(role) != nil || (hasID && broker.ValidateLeaseID(id) != nil):
		writeErrors(req.w, http.StatusBadRequest,
			"credbroker revokes by the prefix "+h.cfg.Mount+"/creds/<role> (every lease of a role) or a whole lease id, never a wider one")
		return
	}
	// Selectors combine with AND: a whole lease id under another role than
	// the lease's is a prefix nothing is under, as in Vault.
	sel := &pb.RevokeLeasesRequest{Role: role}
	if hasID {
		sel.LeaseIds = []string{id}
	}
	if _, err := h.admin.RevokeLeases(req.ctx, sel); err != nil {
		writeCallError(req.w, err)
		return
	}
	req.w.WriteHeader(http.StatusNoContent)
}

// liveStates are the states of leases Vault would still list.
var liveStates = []pb.LeaseState{
	pb.LeaseState_LEASE_STATE_ACTIVE,
	pb.LeaseState_LEASE_STATE_REVOKING,
	pb.LeaseState_LEASE_STATE_REVOKE_FAILED,
}

// listLeases is LIST sys/leases/lookup/<prefix> (admin): the ids under
// <mount>/creds/<role>/, the roles with leases under <mount>/creds/, and
// the levels above, as Vault lists key "folders" with a trailing '/'.
func (h *Handler) listLeases(req *request) {
	prefix := strings.TrimPrefix(strings.TrimPrefix(req.path, "sys/leases/lookup"), "/")
	mount := h.cfg.Mount
	var role string
	switch {
	case prefix == "" || prefix == mount || prefix == mount+"/creds":
	default:
		rest, ok := strings.CutPrefix(prefix, mount+"/creds/")
		if !ok || broker.ValidateRoleName(rest) != nil {
			// Vault answers a prefix with nothing under it so.
			writeErrors(req.w, http.StatusNotFound)
			return
		}
		role = rest
	}
	var leases []*pb.Lease
	for _, st := range liveStates {
		token := ""
		for {
			resp, err := h.admin.ListLeases(req.ctx, &pb.ListLeasesRequest{Role: role, State: st, PageSize: 1000, PageToken: token})
			if err != nil {
				writeCallError(req.w, err)
				return
			}
			leases = append(leases, resp.GetLeases()...)
			if token = resp.GetNextPageToken(); token == "" {
				break
			}
		}
	}
	var keys []string
	switch {
	case role != "":
		for _, l := range leases {
			keys = append(keys, l.GetId())
		}
	case prefix == mount+"/creds":
		seen := map[string]bool{}
		for _, l := range leases {
			if !seen[l.GetRole()] {
				seen[l.GetRole()] = true
				keys = append(keys, l.GetRole()+"/")
			}
		}
	case len(leases) > 0 && prefix == mount:
		keys = []string{"creds/"}
	case len(leases) > 0:
		first, _, _ := strings.Cut(mount, "/")
		keys = []string{first + "/"}
	}
	if len(keys) == 0 {
		writeErrors(req.w, http.StatusNotFound)
		return
	}
	slices.Sort(keys)
	s := newSecret()
	s.Data = map[string]any{"keys": keys}
	writeJSON(req.w, http.StatusOK, s)
}
