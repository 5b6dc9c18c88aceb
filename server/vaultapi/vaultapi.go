package vaultapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"runtime/debug"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/server"
)

// DefaultMount is vault_api.mount's default: the path Vault's database
// secrets engine is usually enabled at, so clients' paths
// (database/creds/<role>) need no change.
const DefaultMount = "database"

// MaxBodyBytes bounds a request body. The largest real one is a lease id
// and an increment; Vault's own default limit is far larger, but nothing
// served here needs more.
const MaxBodyBytes = 64 << 10

// mountSegment is one segment of a mount path, as Vault's mount paths are
// written in practice.
var mountSegment = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// reservedMounts are the first segments Vault keeps for itself.
var reservedMounts = map[string]bool{"sys": true, "auth": true, "identity": true, "cubbyhole": true}

// ValidateMount reports whether m can be vault_api.mount: one or more
// segments of letters, digits, '_', '.' and '-' separated by '/', with no
// leading or trailing '/', not under a path Vault reserves.
func ValidateMount(m string) error {
	if m == "" {
		return errors.New("mount is empty")
	}
	if len(m) > 128 {
		return fmt.Errorf("mount is %d bytes, at most 128 are allowed", len(m))
	}
	for _, seg := range strings.Split(m, "/") {
		if !mountSegment.MatchString(seg) {
			return fmt.Errorf("mount %q: want segments of letters, digits, '_', '.' and '-' separated by '/', without a leading or trailing '/'", m)
		}
	}
	first, _, _ := strings.Cut(m, "/")
	if reservedMounts[first] {
		return fmt.Errorf("mount %q: %s/ is a path Vault reserves", m, first)
	}
	return nil
}

// Config configures the Handler.
type Config struct {
	// Invoker runs every call (server.Config.Invoker). Required.
	Invoker *server.Invoker
	// Mount is where the database engine appears. Default DefaultMount.
	Mount string
	// Ready reports whether the broker serves calls; sys/health answers
	// 503 while it returns an error. nil is always ready.
	Ready func(context.Context) error
	// Version is reported by sys/health and sys/seal-status.
	Version string
	// Logger receives the requests that fail for a reason the caller is
	// not told (a panic); calls are logged by the server. Default: discard.
	Logger *slog.Logger
}

// Handler serves the Vault-compatible API.
type Handler struct {
	cfg   Config
	log   *slog.Logger
	creds pb.CredentialServiceClient
	admin pb.AdminServiceClient
}

// New returns the Handler of cfg.
func New(cfg Config) (*Handler, error) {
	if cfg.Invoker == nil {
		return nil, errors.New("vaultapi: Invoker is required")
	}
	if cfg.Mount == "" {
		cfg.Mount = DefaultMount
	}
	if err := ValidateMount(cfg.Mount); err != nil {
		return nil, fmt.Errorf("vaultapi: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Handler{
		cfg:   cfg,
		log:   log,
		creds: pb.NewCredentialServiceClient(markingConn{cfg.Invoker}),
		admin: pb.NewAdminServiceClient(markingConn{cfg.Invoker}),
	}, nil
}

// request is one HTTP request on its way through the handler.
type request struct {
	w     http.ResponseWriter
	r     *http.Request
	ctx   context.Context // carries the caller (server.ContextWithCaller)
	op    string          // "read", "list", "update", "head"
	path  string          // after /v1/, without a trailing '/'
	token string
	// called is set once the request has made a call through the
	// Invoker, which logs and audits it; requests answered before that
	// are logged by ServeHTTP.
	called bool
}

type requestKey struct{}

// Operations, as Vault names them: GET is read, LIST (or GET with
// ?list=true) is list, PUT and POST are update.
const (
	opRead   = "read"
	opList   = "list"
	opUpdate = "update"
	// opHead is HEAD, which only sys/health answers: a HEAD of creds
	// must not issue a credential whose answer nobody reads.
	opHead = "head"
)

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			h.log.Error("panic in the Vault API handler", "path", truncate(r.URL.Path), "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			writeErrors(w, http.StatusInternalServerError, "internal error")
		}
	}()
	path, ok := strings.CutPrefix(r.URL.Path, "/v1/")
	if !ok {
		writeErrors(w, http.StatusNotFound, "credbroker serves Vault's API under /v1/ only")
		return
	}
	rec := &statusRecorder{ResponseWriter: w}
	req := &request{w: rec, r: r}
	req.path = strings.TrimSuffix(path, "/")
	defer h.logUncalled(req, rec)
	switch r.Method {
	case http.MethodHead:
		req.op = opHead
	case http.MethodGet:
		req.op = opRead
		if l := r.URL.Query().Get("list"); l == "true" || l == "1" {
			req.op = opList
		}
	case "LIST":
		req.op = opList
	case http.MethodPut, http.MethodPost:
		req.op = opUpdate
	default:
		writeErrors(rec, http.StatusMethodNotAllowed, "unsupported operation")
		return
	}
	req.token = r.Header.Get("X-Vault-Token")
	if req.token == "" {
		if scheme, tok, found := strings.Cut(r.Header.Get("Authorization"), " "); found && strings.EqualFold(scheme, "bearer") {
			req.token = strings.TrimSpace(tok)
		}
	}
	req.ctx = server.ContextWithCaller(r.Context(), server.Caller{
		Addr:  remoteAddr(r),
		TLS:   r.TLS,
		Token: req.token,
		Via:   "vault_api",
	})
	req.ctx = context.WithValue(req.ctx, requestKey{}, req)
	r.Body = http.MaxBytesReader(rec, r.Body, MaxBodyBytes)
	h.route(req)
}

// route finds the endpoint of a request.
func (h *Handler) route(req *request) {
	p := req.path
	mount := h.cfg.Mount
	switch {
	case p == "sys/health":
		h.only(req, h.health, opRead, opHead)
	case p == "sys/seal-status":
		h.only(req, h.sealStatus, opRead)
	case p == "sys/mounts":
		h.only(req, h.mounts, opRead)
	case strings.HasPrefix(p, "sys/internal/ui/mounts/"):
		h.only(req, h.preflight, opRead)
	case p == "sys/leases/lookup" && req.op == opList,
		strings.HasPrefix(p, "sys/leases/lookup/"):
		h.only(req, h.listLeases, opList)
	case p == "sys/leases/lookup":
		h.only(req, h.lookup, opUpdate)
	case p == "sys/leases/renew", p == "sys/renew",
		strings.HasPrefix(p, "sys/leases/renew/"), strings.HasPrefix(p, "sys/renew/"):
		h.only(req, h.renew, opUpdate)
	case p == "sys/leases/revoke", p == "sys/revoke",
		strings.HasPrefix(p, "sys/leases/revoke/"), strings.HasPrefix(p, "sys/revoke/"):
		h.only(req, h.revoke, opUpdate)
	case strings.HasPrefix(p, "sys/leases/revoke-prefix/"), strings.HasPrefix(p, "sys/revoke-prefix/"):
		h.only(req, h.revokePrefix, opUpdate)
	case p == "auth/token/lookup-self":
		h.only(req, h.lookupSelf, opRead, opUpdate)
	case p == "auth/token/renew-self":
		h.only(req, h.renewSelf, opUpdate)
	case strings.HasPrefix(p, mount+"/creds/"):
		h.only(req, h.issue, opRead, opUpdate)
	case p == mount+"/roles":
		h.only(req, h.listRoles, opList)
	case strings.HasPrefix(p, mount+"/roles/"):
		h.only(req, h.readRole, opRead)
	default:
		// Vault's wording for a path no mount serves. The path is not
		// echoed: it is the caller's, and may be anything.
		writeErrors(req.w, http.StatusNotFound, "no handler for route: credbroker serves "+mount+"/creds, "+mount+"/roles, sys/leases and auth/token/*-self (see docs/vault-compatibility.md)")
	}
}

// only runs fn if the request's operation is one of ops, else answers 405
// as Vault does for an operation a path does not support.
func (h *Handler) only(req *request, fn func(*request), ops ...string) {
	for _, op := range ops {
		if req.op == op {
			fn(req)
			return
		}
	}
	writeErrors(req.w, http.StatusMethodNotAllowed, "unsupported operation")
}

// markingConn marks the request of a call's context as called.
type markingConn struct{ inv *server.Invoker }

func (m markingConn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	if req, ok := ctx.Value(requestKey{}).(*request); ok {
		req.called = true
	}
	return m.inv.Invoke(ctx, method, args, reply, opts...)
}

func (m markingConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return m.inv.NewStream(ctx, desc, method, opts...)
}

// statusRecorder remembers the status a handler answered.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.code == 0 {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// logUncalled logs a request the handler answered without a call (a
// call has its own log line and audit record): a refused path, method or
// body, a token lookup. Probes are not logged: they come every few
// seconds and say nothing.
func (h *Handler) logUncalled(req *request, rec *statusRecorder) {
	if req.called || req.path == "sys/health" || req.path == "sys/seal-status" {
		return
	}
	level := slog.LevelInfo
	if rec.code >= 500 {
		level = slog.LevelError
	}
	h.log.LogAttrs(req.r.Context(), level, "vault_api request",
		slog.String("method", req.r.Method),
		slog.String("path", truncate(req.r.URL.Path)),
		slog.Int("status", rec.code),
		slog.String("peer", req.r.RemoteAddr))
}

func remoteAddr(r *http.Request) net.Addr {
	if a, err := net.ResolveTCPAddr("tcp", r.RemoteAddr); err == nil {
		return a
	}
	return &net.UnixAddr{Name: r.RemoteAddr, Net: "unix"}
}

// body decodes a JSON object body into v. An empty body is an empty
// object. It answers the request and returns false on a malformed one.
func (req *request) body(v any) bool {
	raw, err := io.ReadAll(req.r.Body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeErrors(req.w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", MaxBodyBytes))
			return false
		}
		writeErrors(req.w, http.StatusBadRequest, "failed to read the request body")
		return false
	}
	if len(strings.TrimSpace(string(raw))) == 0 {
		return true
	}
	if err := json.Unmarshal(raw, v); err != nil {
		// json's messages name a type or one character, never the
		// body's content.
		writeErrors(req.w, http.StatusBadRequest, "failed to parse JSON input: "+err.Error())
		return false
	}
	return true
}

// secret is Vault's response to a logical request (api.Secret).
type secret struct {
	RequestID     string         `json:"request_id"`
	LeaseID       string         `json:"lease_id"`
	Renewable     bool           `json:"renewable"`
	LeaseDuration int64          `json:"lease_duration"`
	Data          map[string]any `json:"data"`
	WrapInfo      any            `json:"wrap_info"`
	Warnings      []string       `json:"warnings"`
	Auth          any            `json:"auth"`
	MountType     string         `json:"mount_type,omitempty"`
}

func newSecret() *secret {
	return &secret{RequestID: requestID()}
}

// requestID is a random UUID (version 4), as Vault's request ids are.
func requestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// writeErrors answers Vault's error body, {"errors":[...]}.
func writeErrors(w http.ResponseWriter, code int, msgs ...string) {
	if msgs == nil {
		msgs = []string{}
	}
	writeJSON(w, code, map[string][]string{"errors": msgs})
}

// httpStatus maps a call's gRPC status to the status code Vault answers
// for the same kind of failure.
func httpStatus(c codes.Code) int {
	switch c {
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.NotFound:
		return http.StatusNotFound
	case codes.Unauthenticated, codes.PermissionDenied:
		return http.StatusForbidden
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.Unimplemented:
		return http.StatusMethodNotAllowed
	}
	return http.StatusInternalServerError
}

// writeCallError answers a failed call. The status message is the one a
// gRPC caller would get: written for callers, never holding a password
// (server/errors.go). A refusal starts with Vault's "permission denied",
// which clients (the Go client's LifetimeWatcher) look for.
func writeCallError(w http.ResponseWriter, err error) {
	st := status.Convert(err)
	code := httpStatus(st.Code())
	switch st.Code() {
	case codes.Unauthenticated, codes.PermissionDenied:
		writeErrors(w, code, "permission denied", st.Message())
	case codes.Internal, codes.Unknown, codes.DataLoss:
		writeErrors(w, code, "internal error")
	default:
		writeErrors(w, code, st.Message())
	}
}

// truncate bounds what a caller can make the handler write to its log.
func truncate(s string) string {
	const max = 128
	if len(s) <= max {
		return s
	}
	return s[:max] + "..."
}
