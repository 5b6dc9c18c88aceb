// Package kvtest is an in-process stand-in for Vault in tests: an HTTP
// server speaking the part of Vault's API that credbroker uses — KV v2
// read and write (with check-and-set), AppRole login, token lookup-self and
// renew-self. It keeps the secrets in memory.
//
// It models what real Vault does with tokens, since that is where a client
// goes wrong: service tokens are renewable up to a max TTL, batch tokens
// are not renewable at all, every token stops working at the end of its
// TTL (on the server's clock, which a test may control), a secret id may
// have a number of uses, and logins are counted so a test can bound them.
package kvtest

import (
	"bytes"
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

// Clock is the server's time; internal/fakeclock implements it.
type Clock interface{ Now() time.Time }

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

// Options shape the tokens the server hands out.
type Options struct {
	// TokenTTL is the TTL of RootToken, of AppRole logins' tokens and of
	// each renewal (Vault's default_lease_ttl / token_ttl). 0: tokens
	// never expire, as a root token.
	TokenTTL time.Duration
	// MaxTTL caps a service token's life across renewals (token_max_ttl);
	// 0: no cap. A renewal that would pass it is granted only up to it,
	// with a warning, as Vault does.
	MaxTTL time.Duration
	// Batch makes AppRole logins hand out batch tokens (token_type=batch):
	// not renewable, gone at the end of their TTL.
	Batch bool
	// SecretIDUses is how many logins the secret id is good for
	// (secret_id_num_uses); 0: unlimited.
	SecretIDUses int
	// Clock decides when tokens expire; nil is the real time.
	Clock Clock
}

// Server is a fake Vault.
type Server struct {
	*httptest.Server
	// Mount is the KV v2 mount ("secret").
	Mount string
	// RootToken is a valid, renewable service token.
	RootToken string
	// RoleID and SecretID log in through AppRole.
	RoleID, SecretID string

	opts Options

	mu         sync.Mutex
	secrets    map[string][]map[string]any // path -> versions (index 0 is version 1)
	tokens     map[string]*token
	secretIDs  map[string]int // secret id -> uses left (-1: unlimited)
	logins     int            // successful AppRole logins
	failLogins int            // how many next logins answer 500
	renewals   chan string
	writeErr   func(path string) bool
	deny       func(path string) bool
	uses       map[string]int // token -> authenticated requests
}

type token struct {
	batch     bool
	issued    time.Time
	ttl       time.Duration // the TTL it was created with, and each renewal's default
	expires   time.Time     // zero: never
	maxExpire time.Time     // zero: no max TTL
}

// New starts a server whose tokens (RootToken and AppRole logins' tokens)
// are renewable service tokens of TTL tokenTTL, on the real clock, and
// stops it when the test ends.
func New(t testing.TB, tokenTTL time.Duration) *Server {
	t.Helper()
	return NewServer(t, Options{TokenTTL: tokenTTL})
}

// NewServer starts a server with the given options and stops it when the
// test ends.
func NewServer(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.Clock == nil {
		opts.Clock = realClock{}
	}
	s := &Server{
		Mount:     "secret",
		RoleID:    random(),
		SecretID:  random(),
		opts:      opts,
		secrets:   map[string][]map[string]any{},
		tokens:    map[string]*token{},
		secretIDs: map[string]int{},
		uses:      map[string]int{},
		renewals:  make(chan string, 100),
	}
	s.secretIDs[s.SecretID] = uses(opts.SecretIDUses)
	s.RootToken = s.newToken(false)
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

func uses(n int) int {
	if n <= 0 {
		return -1
	}
	return n
}

func random() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// newToken makes a token of the server's TTL and max TTL.
func (s *Server) newToken(batch bool) string {
	now := s.opts.Clock.Now()
	tk := &token{batch: batch, issued: now, ttl: s.opts.TokenTTL}
	if tk.ttl > 0 {
		tk.expires = now.Add(tk.ttl)
	}
	if s.opts.MaxTTL > 0 && !batch {
		tk.maxExpire = now.Add(s.opts.MaxTTL)
		if tk.expires.IsZero() || tk.expires.After(tk.maxExpire) {
			tk.expires = tk.maxExpire
		}
	}
	prefix := "hvs."
	if batch {
		prefix = "hvb."
	}
	id := prefix + random()
	s.mu.Lock()
	s.tokens[id] = tk
	s.mu.Unlock()
	return id
}

// NewToken makes another valid service token, as an operator or Vault
// Agent would, for a test that rotates the token on disk.
func (s *Server) NewToken() string { return s.newToken(false) }

// RevokeToken makes a token invalid at once.
func (s *Server) RevokeToken(tok string) {
	s.mu.Lock()
	delete(s.tokens, tok)
	s.mu.Unlock()
}

// RevokeTokens makes every token issued so far invalid at once, RootToken
// included, as `vault token revoke` or a lost token store would.
func (s *Server) RevokeTokens() {
	s.mu.Lock()
	clear(s.tokens)
	s.mu.Unlock()
}

// TokenUses returns how many authenticated requests (reads, writes,
// lookups, renewals) came with tok.
func (s *Server) TokenUses(tok string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.uses[tok]
}

// DenyPaths makes KV requests for paths for which deny returns true answer
// 403 to a valid token, as a policy without access does (nil: none).
func (s *Server) DenyPaths(deny func(path string) bool) {
	s.mu.Lock()
	s.deny = deny
	s.mu.Unlock()
}

// NewSecretID adds a secret id good for uses logins (0: unlimited), as
// `vault write -f auth/approle/role/R/secret-id` would.
func (s *Server) NewSecretID(n int) string {
	id := random()
	s.mu.Lock()
	s.secretIDs[id] = uses(n)
	s.mu.Unlock()
	return id
}

// SecretIDUsesLeft returns how many logins a secret id has left; -1 is
// unlimited, 0 means Vault has deleted it.
func (s *Server) SecretIDUsesLeft(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.secretIDs[id]
	if !ok {
		return 0
	}
	return n
}

// Logins returns how many AppRole logins succeeded.
func (s *Server) Logins() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logins
}

// FailLogins makes the next n AppRole logins answer 500, as a Vault that
// is sealed or unreachable behind a load balancer would.
func (s *Server) FailLogins(n int) {
	s.mu.Lock()
	s.failLogins = n
	s.mu.Unlock()
}

// Renewals receives the token of every successful renew-self call.
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
	s.PutData(path, m)
}

// PutData stores a new version of the secret at path directly, with
// values of any JSON type (`vault kv put secret/x port=5432` stores a
// string; a JSON body stores a number).
func (s *Server) PutData(path string, data map[string]any) {
	m := roundTrip(data)
	s.mu.Lock()
	s.secrets[path] = append(s.secrets[path], m)
	s.mu.Unlock()
}

// Get returns the string fields of the newest version of the secret at
// path and its number (0 if there is none).
func (s *Server) Get(path string) (map[string]string, int) {
	data, v := s.GetData(path)
	if data == nil {
		return nil, 0
	}
	out := map[string]string{}
	for k, val := range data {
		if str, ok := val.(string); ok {
			out[k] = str
		}
	}
	return out, v
}

// GetData returns the newest version of the secret at path as stored
// (numbers as json.Number) and its number (0 if there is none).
func (s *Server) GetData(path string) (map[string]any, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	vs := s.secrets[path]
	if len(vs) == 0 {
		return nil, 0
	}
	return roundTrip(vs[len(vs)-1]), len(vs)
}

// roundTrip copies data through JSON, as Vault's storage does.
func roundTrip(data map[string]any) map[string]any {
	b, err := json.Marshal(data)
	if err != nil {
		panic(err)
	}
	var out map[string]any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&out); err != nil {
		panic(err)
	}
	return out
}

func reply(w http.ResponseWriter, code int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(body)
}

func fail(w http.ResponseWriter, code int, msg string) {
	reply(w, code, map[string]any{"errors": []string{msg}})
}

// valid returns the token if it exists and has not expired; an expired
// one is forgotten, as Vault's expiration manager revokes it.
func (s *Server) valid(id string) (*token, bool) {
	now := s.opts.Clock.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	tk, ok := s.tokens[id]
	if !ok {
		return nil, false
	}
	if !tk.expires.IsZero() && !now.Before(tk.expires) {
		delete(s.tokens, id)
		return nil, false
	}
	s.uses[id]++
	return tk, true
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	path := strings.TrimPrefix(r.URL.Path, "/v1/")
	if path == "auth/approle/login" && (r.Method == http.MethodPut || r.Method == http.MethodPost) {
		s.login(w, r)
		return
	}
	id := r.Header.Get("X-Vault-Token")
	tk, ok := s.valid(id)
	if !ok {
		// Vault answers an unknown, revoked or expired token alike.
		fail(w, http.StatusForbidden, "permission denied")
		return
	}
	switch {
	case path == "auth/token/lookup-self" && r.Method == http.MethodGet:
		s.lookupSelf(w, id, tk)
	case path == "auth/token/renew-self" && (r.Method == http.MethodPut || r.Method == http.MethodPost):
		s.renewSelf(w, r, id, tk)
	case strings.HasPrefix(path, s.Mount+"/data/"):
		s.kv(w, r, strings.TrimPrefix(path, s.Mount+"/data/"))
	default:
		fail(w, http.StatusNotFound, "no handler for route "+path)
	}
}

func seconds(d time.Duration) int { return int(d / time.Second) }

func (s *Server) lookupSelf(w http.ResponseWriter, id string, tk *token) {
	now := s.opts.Clock.Now()
	s.mu.Lock()
	ttl := 0
	var expire any
	if !tk.expires.IsZero() {
		ttl = seconds(tk.expires.Sub(now))
		expire = tk.expires.UTC().Format(time.RFC3339Nano)
	}
	typ := "service"
	if tk.batch {
		typ = "batch"
	}
	data := map[string]any{
		"id": id, "ttl": ttl, "creation_ttl": seconds(tk.ttl), "renewable": !tk.batch && tk.ttl > 0,
		"type": typ, "expire_time": expire, "issue_time": tk.issued.UTC().Format(time.RFC3339Nano),
		"explicit_max_ttl": 0, "policies": []string{"default"},
	}
	s.mu.Unlock()
	reply(w, 200, map[string]any{"data": data})
}

func (s *Server) renewSelf(w http.ResponseWriter, r *http.Request, id string, tk *token) {
	var body struct {
		Increment json.Number `json:"increment"`
	}
	_ = json.NewDecoder(r.Body).Decode(&body)
	if tk.batch {
		fail(w, http.StatusBadRequest, "batch tokens cannot be renewed")
		return
	}
	if tk.ttl == 0 {
		fail(w, http.StatusBadRequest, "lease is not renewable")
		return
	}
	now := s.opts.Clock.Now()
	inc := tk.ttl
	if n, err := body.Increment.Int64(); err == nil && n > 0 {
		inc = time.Duration(n) * time.Second
	}
	var warnings []string
	s.mu.Lock()
	tk.expires = now.Add(inc)
	if !tk.maxExpire.IsZero() && tk.expires.After(tk.maxExpire) {
		tk.expires = tk.maxExpire
		warnings = append(warnings, "TTL of \""+inc.String()+"\" exceeded the effective max_ttl of \""+
			tk.maxExpire.Sub(now).String()+"\"; TTL value is capped accordingly")
	}
	granted := tk.expires.Sub(now)
	s.mu.Unlock()
	select {
	case s.renewals <- id:
	default:
	}
	reply(w, 200, map[string]any{"warnings": warnings, "auth": map[string]any{
		"client_token": id, "renewable": true, "lease_duration": seconds(granted), "token_type": "service",
	}})
}

func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	var body struct {
		RoleID   string `json:"role_id"`
		SecretID string `json:"secret_id"`
	}
	err := json.NewDecoder(r.Body).Decode(&body)
	s.mu.Lock()
	if s.failLogins > 0 {
		s.failLogins--
		s.mu.Unlock()
		fail(w, http.StatusInternalServerError, "local node not active but active cluster node not found")
		return
	}
	left, known := s.secretIDs[body.SecretID]
	if err != nil || body.RoleID != s.RoleID || !known {
		s.mu.Unlock()
		fail(w, http.StatusBadRequest, "invalid role or secret ID")
		return
	}
	if left > 0 {
		if left == 1 {
			delete(s.secretIDs, body.SecretID) // used up: Vault deletes it
		} else {
			s.secretIDs[body.SecretID] = left - 1
		}
	}
	s.logins++
	s.mu.Unlock()
	tok := s.newToken(s.opts.Batch)
	typ, accessor := "service", random()
	if s.opts.Batch {
		typ, accessor = "batch", "" // batch tokens have no accessor
	}
	reply(w, 200, map[string]any{"auth": map[string]any{
		"client_token": tok, "accessor": accessor, "renewable": !s.opts.Batch && s.opts.TokenTTL > 0,
		"lease_duration": seconds(s.opts.TokenTTL), "token_type": typ, "policies": []string{"default"},
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
	if s.deny != nil && s.deny(path) {
		fail(w, http.StatusForbidden, "permission denied")
		return
	}
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
		dec := json.NewDecoder(r.Body)
		dec.UseNumber() // as Vault keeps what it was sent: a number stays a number
		if err := dec.Decode(&body); err != nil || body.Data == nil {
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
