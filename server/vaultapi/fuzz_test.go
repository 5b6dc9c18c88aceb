package vaultapi_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/vaultapi"
)

// FuzzHandler sends the handler any method, path, body and token, with an
// Invoker no broker is attached to (every call answers Unavailable): it
// must answer with a status and a JSON body, never panic (a recovered
// panic is a 500), and never echo the token.
func FuzzHandler(f *testing.F) {
	for _, seed := range []struct{ method, path, body, token string }{
		{"GET", "/v1/database/creds/read_only", "", "t"},
		{"POST", "/v1/database/creds/read_only", `{"ttl":"1h"}`, "t"},
		{"PUT", "/v1/sys/leases/renew", `{"lease_id":"database/creds/read_only/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","increment":"1e400"}`, "t"},
		{"PUT", "/v1/sys/leases/renew", `{"lease_id":"database/creds/read_only/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","increment":-1}`, "t"},
		{"PUT", "/v1/sys/renew/database/creds/x/y/z", `{"increment":[1]}`, "t"},
		{"PUT", "/v1/sys/leases/revoke-prefix/database/creds/ro/../../x", "", "t"},
		{"LIST", "/v1/sys/leases/lookup/database/creds/%00/", "", "t"},
		{"GET", "/v1/sys/leases/lookup/?list=1", "", ""},
		{"GET", "/v1/database/roles/" + strings.Repeat("r", 300), "", "t"},
		{"HEAD", "/v1/sys/health", "", ""},
		{"OPTIONS", "/v1/sys/seal-status", "", ""},
		{"PUT", "/v1/auth/token/renew-self", `nul`, "secret-token"},
		{"GET", "/v1/sys/internal/ui/mounts/database", "", "t"},
	} {
		f.Add(seed.method, seed.path, seed.body, seed.token)
	}
	inv := server.NewInvoker()
	h, err := vaultapi.New(vaultapi.Config{Invoker: inv, Version: "test"})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, method, path, body, token string) {
		req, err := http.NewRequest(method, "http://vault.test/", strings.NewReader(body))
		if err != nil {
			return // not a request net/http would hand the handler
		}
		req.URL.Path = path
		if token != "" {
			req.Header.Set("X-Vault-Token", token)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code == http.StatusInternalServerError {
			t.Fatalf("%s %q: 500 %s", method, path, rec.Body.String())
		}
		out := rec.Body.String()
		if method == http.MethodHead || rec.Code == http.StatusNoContent {
			return
		}
		if !json.Valid([]byte(out)) {
			t.Fatalf("%s %q: %d, body not JSON: %q", method, path, rec.Code, out)
		}
		if len(token) >= 8 && strings.Contains(out, token) && !strings.Contains(path, "token/") {
			t.Fatalf("%s %q: the token is in the answer %q", method, path, out)
		}
	})
}
