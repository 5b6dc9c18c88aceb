// Package kvtest is an in-process stand-in for Vault in tests: an HTTP
// server speaking the part of Vault's API that credbroker uses — KV v2
// read and write (with check-and-set), AppRole login, token lookup-self and
// renew-self. It keeps the secrets in memory and counts renewals.
package kvtest

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// Server is a fake Vault.
type Server struct {
	*httptest.Server
	// Mount is the KV v2 mount ("secret").
	Mount string
	// RootToken is a valid, renewable token.
	RootToken string
	// RoleID and SecretID log in through AppRole.
	RoleID, SecretID string

	mu       sync.Mutex
	secrets  map[string][]map[string]any // path -> versions (index 0 is version 1)
	tokens   map[string]int              // token -> TTL in seconds
	tokenTTL int
	renewals chan string
	writeErr func(path string) bool
}

// New starts a server and stops it when the test ends. tokenTTL is the
// lease of the tokens AppRole login hands out (and of RootToken).
func New(t testing.TB, tokenTTL time.Duration) *Server {
	t.Helper()
	s := &Server{
		Mount:     "secret",
		RootToken: "hvs." + random(),
		RoleID:    random(),
		SecretID:  random(),
		secrets:   map[string][]map[string]any{},
		tokens:    map[string]int{},
		tokenTTL:  int(tokenTTL.Seconds()),
		renewals:  make(chan string, 100),
	}
	s.tokens[s.RootToken] = s.tokenTTL
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

func random() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Renewals receives the token of every renew-self call.
func (s *Server) Renewals() <-chan string { return s.renewals }

// FailWrites makes writes to paths for which fail returns true answer 500
// (nil: none fail), to stand in for Vault going away mid-rotation.
func (s *Server) FailWrites(fail func(path string) bool) {
	s.mu.Lock()
	s.writeErr = fail
	s.mu.Unlock()
}

// Put stores a new version of the secret at path directly.
func (s *Server) Put(path string, data map[string]string) {
	m := map[string]any{}
	for k, v := range data {
		m[k] = v
	}
	s.mu.Lock()
	s.secrets[path] = append(s.secrets[path], m)
	s.mu.Unlock()
}

// Get returns the newest version of the secret at path and its number
// (0 if there is none).
func (s *Server) Get(path string) (map[string]string, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	vs := s.secrets[path]
	if len(vs) == 0 {
		return nil, 0
	}
	out := map[string]string{}
	for k, v := range vs[len(vs)-1] {
		out[k], _ = v.(string)
	}
	return out, len(vs)
}

func reply(w http.ResponseWriter, code int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(body)
}

func fail(w http.ResponseWriter, code int, msg string) {
	reply(w, code, map[string]any{"errors": []string{msg}})
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	path := strings.TrimPrefix(r.URL.Path, "/v1/")
	if path == "auth/approle/login" && (r.Method == http.MethodPut || r.Method == http.MethodPost) {
		s.login(w, r)
		return
	}
	s.mu.Lock()
	_, ok := s.tokens[r.Header.Get("X-Vault-Token")]
	s.mu.Unlock()
	if !ok {
		fail(w, http.StatusForbidden, "permission denied")
		return
	}
	switch {
	case path == "auth/token/lookup-self" && r.Method == http.MethodGet:
		reply(w, 200, map[string]any{"data": map[string]any{"ttl": s.tokenTTL, "renewable": true}})
	case path == "auth/token/renew-self" && (r.Method == http.MethodPut || r.Method == http.MethodPost):
		tok := r.Header.Get("X-Vault-Token")
		select {
		case s.renewals <- tok:
		default:
		}
		reply(w, 200, map[string]any{"auth": map[string]any{
			"client_token": tok, "renewable": true, "lease_duration": s.tokenTTL,
		}})
	case strings.HasPrefix(path, s.Mount+"/data/"):
		s.kv(w, r, strings.TrimPrefix(path, s.Mount+"/data/"))
	default:
		fail(w, http.StatusNotFound, "no handler for route "+path)
	}
}

func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	var body struct {
		RoleID   string `json:"role_id"`
		SecretID string `json:"secret_id"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil || body.RoleID != s.RoleID || body.SecretID != s.SecretID {
		fail(w, http.StatusBadRequest, "invalid role or secret ID")
		return
	}
	tok := "hvs." + random()
	s.mu.Lock()
	s.tokens[tok] = s.tokenTTL
	s.mu.Unlock()
	reply(w, 200, map[string]any{"auth": map[string]any{
		"client_token": tok, "renewable": true, "lease_duration": s.tokenTTL, "policies": []string{"default"},
	}})
}

func metadata(version int) map[string]any {
	return map[string]any{
		"version": version, "created_time": time.Now().UTC().Format(time.RFC3339Nano),
		"deletion_time": "", "destroyed": false,
	}
}

func (s *Server) kv(w http.ResponseWriter, r *http.Request, path string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch r.Method {
	case http.MethodGet:
		vs := s.secrets[path]
		if len(vs) == 0 {
			reply(w, http.StatusNotFound, map[string]any{"errors": []string{}})
			return
		}
		reply(w, 200, map[string]any{"data": map[string]any{"data": vs[len(vs)-1], "metadata": metadata(len(vs))}})
	case http.MethodPut, http.MethodPost:
		if s.writeErr != nil && s.writeErr(path) {
			fail(w, http.StatusInternalServerError, "internal error")
			return
		}
		var body struct {
			Data    map[string]any `json:"data"`
			Options struct {
				CAS *int `json:"cas"`
			} `json:"options"`
		}
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil || body.Data == nil {
			fail(w, http.StatusBadRequest, "no data provided")
			return
		}
		if body.Options.CAS != nil && *body.Options.CAS != len(s.secrets[path]) {
			fail(w, http.StatusBadRequest, "check-and-set parameter did not match the current version")
			return
		}
		s.secrets[path] = append(s.secrets[path], body.Data)
		reply(w, 200, map[string]any{"data": metadata(len(s.secrets[path]))})
	default:
		fail(w, http.StatusMethodNotAllowed, "method not allowed")
	}
}
