package vaultapi

import (
	"net/http"
	"slices"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// issue is GET|POST <mount>/creds/<role>: a new PostgreSQL user and its
// lease, as IssueCredential issues them for the caller.
func (h *Handler) issue(req *request) {
	if req.op == opUpdate {
		// Vault's creds endpoint takes no parameters; a body must still
		// be JSON, as Vault checks it.
		var ignored map[string]any
		if !req.body(&ignored) {
			return
		}
	}
	role := strings.TrimPrefix(req.path, h.cfg.Mount+"/creds/")
	if strings.Contains(role, "/") || broker.ValidateRoleName(role) != nil {
		// Not echoed: it is not a role name.
		writeErrors(req.w, http.StatusBadRequest, "unknown role: not a valid role name")
		return
	}
	resp, err := h.creds.IssueCredential(req.ctx, &pb.IssueCredentialRequest{Role: role})
	if status.Code(err) == codes.NotFound {
		// The database engine's answer for a role it does not have.
		writeErrors(req.w, http.StatusBadRequest, "unknown role: "+role)
		return
	}
	if err != nil {
		writeCallError(req.w, err)
		return
	}
	l, c := resp.GetLease(), resp.GetCredential()
	s := newSecret()
	s.LeaseID = h.vaultLeaseID(l.GetRole(), l.GetId())
	s.Renewable = true
	// The TTL granted, from the broker's own instants: the time the
	// response takes to arrive is the client's to account for, as with
	// Vault.
	s.LeaseDuration = int64(l.GetExpireTime().AsTime().Sub(l.GetIssueTime().AsTime()).Round(1e9) / 1e9)
	s.MountType = "database"
	s.Data = map[string]any{
		"username": c.GetUsername(),
		"password": c.GetPassword(),
		// credbroker's own, beside Vault's two: where to connect.
		"host":     c.GetHost(),
		"port":     c.GetPort(),
		"database": c.GetDatabase(),
		"dsn":      c.GetDsn(),
	}
	writeJSON(req.w, http.StatusOK, s)
}

// listRoles is LIST <mount>/roles (admin, as AdminService.ListRoles).
func (h *Handler) listRoles(req *request) {
	roles, ok := h.roles(req)
	if !ok {
		return
	}
	keys := make([]string, 0, len(roles))
	for _, r := range roles {
		keys = append(keys, r.GetName())
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

// readRole is GET <mount>/roles/<name>: the role as the database engine
// shows one, read-only (roles are brokerd's configuration).
func (h *Handler) readRole(req *request) {
	name := strings.TrimPrefix(req.path, h.cfg.Mount+"/roles/")
	roles, ok := h.roles(req)
	if !ok {
		return
	}
	for _, r := range roles {
		if r.GetName() != name {
			continue
		}
		s := newSecret()
		s.Data = map[string]any{
			"db_name":               r.GetTarget(),
			"default_ttl":           int64(r.GetDefaultTtl().AsDuration().Seconds()),
			"max_ttl":               int64(r.GetMaxTtl().AsDuration().Seconds()),
			"credential_type":       "password",
			"creation_statements":   []string{},
			"revocation_statements": []string{},
			"rollback_statements":   []string{},
			"renew_statements":      []string{},
			// credbroker's own: what the users inherit, and where.
			"proxy_role": r.GetProxyRole(),
			"database":   r.GetDatabase(),
		}
		writeJSON(req.w, http.StatusOK, s)
		return
	}
	// Vault answers a read of nothing with 404 and no message.
	writeErrors(req.w, http.StatusNotFound)
}

func (h *Handler) roles(req *request) ([]*pb.Role, bool) {
	resp, err := h.admin.ListRoles(req.ctx, &pb.ListRolesRequest{})
	if err != nil {
		writeCallError(req.w, err)
		return nil, false
	}
	return resp.GetRoles(), true
}
