package server_test

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/grpc/metadata"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/server"
)

var (
	leaseIDShape = regexp.MustCompile(`^[a-z2-7]{32}$`)
	// What may appear unquoted in SQL identifiers, and so in usernames
	// built from role names.
	plainIdentifier = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
)

const fuzzToken = "fuzz-known-token-0123456789"

// hasControl reports control characters, which no message or accepted
// value may carry into a log line.
func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

// FuzzRequestValidation feeds caller-controlled strings through every
// validator at the edge: role names, lease ids, metadata, identities and
// allow-list patterns, and the authorization header. What a validator
// accepts must have the shape the code after it relies on (role names
// that need no SQL quoting, lease ids of one alphabet, metadata and
// identities without control characters), and no error may echo a
// control character or the token.
func FuzzRequestValidation(f *testing.F) {
	f.Add("read_only", "abcdefghijklmnopqrstuvwxyz234567", "team", "payments", "Bearer "+fuzzToken)
	f.Add("x'; DROP ROLE postgres; --", "a\x00b", "k\n", "\xff", "bearer  x")
	f.Add(strings.Repeat("a", 64), strings.Repeat("a", 32), "pg_x", "$$", "Basic Zm9vOmJhcg==")

	authn, err := server.NewPolicyAuthenticator([]server.TokenEntry{{Identity: "svc", SHA256: server.TokenHash(fuzzToken)}}, []string{"ops"})
	if err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, role, leaseID, key, value, authz string) {
		if err := broker.ValidateRoleName(role); err == nil {
			if !plainIdentifier.MatchString(role) || len(role) > 40 {
				t.Fatalf("role %q accepted", role)
			}
		} else if hasControl(err.Error()) {
			t.Fatalf("role error carries control characters: %q", err)
		}

		if err := broker.ValidateLeaseID(leaseID); err == nil {
			if !leaseIDShape.MatchString(leaseID) {
				t.Fatalf("lease id %q accepted", leaseID)
			}
		} else if strings.Contains(err.Error(), leaseID) && leaseID != "" && hasControl(leaseID) {
			t.Fatalf("lease id error echoes the id: %q", err)
		}

		md := map[string]string{key: value}
		if err := broker.ValidateMetadata(md); err == nil {
			if !utf8.ValidString(key) || !utf8.ValidString(value) || hasControl(key) || hasControl(value) {
				t.Fatalf("metadata %q=%q accepted", key, value)
			}
			if len(key) > broker.MaxMetadataKeyBytes || len(value) > broker.MaxMetadataValueBytes {
				t.Fatalf("metadata over the limits accepted: %d/%d bytes", len(key), len(value))
			}
		} else if hasControl(err.Error()) {
			t.Fatalf("metadata error carries control characters: %q", err)
		}

		for _, name := range []string{role, key, value} {
			if err := server.ValidateIdentity(name); err == nil {
				if !utf8.ValidString(name) || hasControl(name) || len(name) > server.MaxIdentityBytes || name == "" {
					t.Fatalf("identity %q accepted", name)
				}
			}
			if server.ValidateGlob(name) == nil {
				// An accepted pattern never panics when matched, and
				// matches the identities the authorizer is given.
				a, err := server.NewPolicyAuthorizer(map[string][]string{"r": {name}})
				if err != nil {
					t.Fatalf("ValidateGlob accepted %q but NewPolicyAuthorizer refused it: %v", name, err)
				}
				_ = a.AuthorizeIssue(server.Identity{Name: value}, "r")
			}
		}

		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", authz))
		id, err := authn.Authenticate(ctx)
		switch {
		case err == nil && id.Name != "svc":
			t.Fatalf("authorization %q authenticated as %q", authz, id.Name)
		case err == nil && !strings.HasSuffix(authz, fuzzToken):
			t.Fatalf("authorization %q accepted without the token", authz)
		case err != nil && len(authz) > 8 && strings.Contains(err.Error(), authz):
			t.Fatalf("authentication error echoes the header: %q", err)
		}
	})
}
