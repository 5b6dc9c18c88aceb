package vaultapi

import (
	"net/http"
	"strings"
	"time"

	"github.com/credbroker/credbroker/server"
)

// health is GET sys/health, unauthenticated as Vault's: 200 while the
// broker serves calls, 503 while it does not (shutting down, the audit
// log unwritable under audit.required, no target reachable). credbroker is
// never sealed nor a standby.
func (h *Handler) health(req *request) {
	code := http.StatusOK
	if h.cfg.Ready != nil {
		if err := h.cfg.Ready(req.r.Context()); err != nil {
			code = http.StatusServiceUnavailable
		}
	}
	writeJSON(req.w, code, map[string]any{
		"initialized":                  true,
		"sealed":                       false,
		"standby":                      false,
		"performance_standby":          false,
		"replication_performance_mode": "disabled",
		"replication_dr_mode":          "disabled",
		"server_time_utc":              time.Now().Unix(),
		"version":                      h.cfg.Version,
		"cluster_name":                 "credbroker",
		"cluster_id":                   "",
	})
}

// sealStatus is GET sys/seal-status: never sealed.
func (h *Handler) sealStatus(req *request) {
	writeJSON(req.w, http.StatusOK, map[string]any{
		"type":          "shamir",
		"initialized":   true,
		"sealed":        false,
		"t":             1,
		"n":             1,
		"progress":      0,
		"nonce":         "",
		"version":       h.cfg.Version,
		"build_date":    "",
		"migration":     false,
		"cluster_name":  "credbroker",
		"cluster_id":    "",
		"recovery_seal": false,
		"storage_type":  "credbroker",
	})
}

// authenticated establishes the caller for the requests that map to no
// call, with the server's Authenticator; it answers 403 on failure.
func (h *Handler) authenticated(req *request) (server.Identity, bool) {
	id, err := h.cfg.Invoker.Authenticate(req.ctx)
	if err != nil {
		writeCallError(req.w, err)
		return server.Identity{}, false
	}
	return id, true
}

// mounts is GET sys/mounts: the one mount, a database engine. Like
// Vault's, the answer has the mounts both at the top level and in data.
func (h *Handler) mounts(req *request) {
	if _, ok := h.authenticated(req); !ok {
		return
	}
	mounts := map[string]any{
		h.cfg.Mount + "/": map[string]any{
			"type":                    "database",
			"description":             "credbroker: short-lived PostgreSQL users that inherit a proxy role",
			"accessor":                "database_credbroker",
			"uuid":                    "",
			"local":                   false,
			"seal_wrap":               false,
			"external_entropy_access": false,
			"options":                 nil,
			"plugin_version":          "",
			"running_plugin_version":  h.cfg.Version,
			"config": map[string]any{
				"default_lease_ttl": 0,
				"max_lease_ttl":     0,
				"force_no_cache":    false,
			},
		},
	}
	body := map[string]any{}
	for k, v := range mounts {
		body[k] = v
	}
	s := newSecret()
	body["request_id"] = s.RequestID
	body["lease_id"] = ""
	body["lease_duration"] = 0
	body["renewable"] = false
	body["data"] = mounts
	body["wrap_info"] = nil
	body["warnings"] = nil
	body["auth"] = nil
	writeJSON(req.w, http.StatusOK, body)
}

// preflight is GET sys/internal/ui/mounts/<path>, which Vault Agent and
// consul-template ask before every read to learn whether the path is a
// KV v2 store: under the mount it is the database engine, anywhere else
// there is nothing.
func (h *Handler) preflight(req *request) {
	if _, ok := h.authenticated(req); !ok {
		return
	}
	p := strings.TrimPrefix(req.path, "sys/internal/ui/mounts/")
	if p != h.cfg.Mount && !strings.HasPrefix(p, h.cfg.Mount+"/") {
		writeErrors(req.w, http.StatusNotFound)
		return
	}
	s := newSecret()
	s.Data = map[string]any{"path": h.cfg.Mount + "/", "type": "database", "options": nil}
	writeJSON(req.w, http.StatusOK, s)
}

// policies are the Vault policy names an identity is shown with.
func policies(id server.Identity) []string {
	if id.Admin {
		return []string{"default", "credbroker-admin"}
	}
	return []string{"default"}
}

// lookupSelf is GET auth/token/lookup-self: the caller's identity, shown
// as a token that never expires (credbroker's tokens are configured, not
// leased).
func (h *Handler) lookupSelf(req *request) {
	id, ok := h.authenticated(req)
	if !ok {
		return
	}
	s := newSecret()
	s.Data = map[string]any{
		"accessor":         "",
		"creation_time":    0,
		"creation_ttl":     0,
		"display_name":     id.Name,
		"entity_id":        "",
		"expire_time":      nil,
		"explicit_max_ttl": 0,
		// The caller's own token, as Vault returns it ("" for a
		// certificate or local caller).
		"id":        req.token,
		"meta":      map[string]string{"identity": id.Name},
		"num_uses":  0,
		"orphan":    true,
		"path":      "auth/token/create",
		"policies":  policies(id),
		"renewable": false,
		"ttl":       0,
		"type":      "service",
	}
	writeJSON(req.w, http.StatusOK, s)
}

// renewSelf is PUT auth/token/renew-self: nothing to renew, answered as
// Vault answers for a token without a TTL, so clients that renew their
// token on a schedule keep working.
func (h *Handler) renewSelf(req *request) {
	var ignored map[string]any
	if !req.body(&ignored) {
		return
	}
	id, ok := h.authenticated(req)
	if !ok {
		return
	}
	s := newSecret()
	s.Warnings = []string{"credbroker tokens do not expire; there is nothing to renew"}
	s.Auth = map[string]any{
		"client_token":   req.token,
		"accessor":       "",
		"policies":       policies(id),
		"token_policies": policies(id),
		"metadata":       map[string]string{"identity": id.Name},
		"lease_duration": 0,
		"renewable":      false,
		"entity_id":      "",
		"token_type":     "service",
		"orphan":         true,
	}
	writeJSON(req.w, http.StatusOK, s)
}
