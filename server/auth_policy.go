package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"strings"
	"unicode/utf8"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/credbroker/credbroker/broker"
)

// MaxIdentityBytes bounds an identity's name. Identities are stored as the
// Client of every lease they are issued and written to logs and the audit
// trail, so a certificate with a kilobyte CN is refused, not stored.
const MaxIdentityBytes = 256

// ValidateIdentity reports whether name can be an identity: 1 to
// MaxIdentityBytes bytes of valid UTF-8 without control characters or
// spaces at either end. It is used for names from certificates, from the
// token table and the admins list, and for the client selectors of
// AdminService (which name identities).
func ValidateIdentity(name string) error {
	switch {
	case name == "":
		return errors.New("identity is empty")
	case len(name) > MaxIdentityBytes:
		return fmt.Errorf("identity is %d bytes, at most %d are allowed", len(name), MaxIdentityBytes)
	case !utf8.ValidString(name):
		return errors.New("identity is not valid UTF-8")
	case strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) }):
		return errors.New("identity contains control characters")
	case strings.TrimSpace(name) != name:
		return errors.New("identity starts or ends with white space")
	}
	return nil
}

// TokenHash is the hex SHA-256 of a bearer token: what the configuration
// stores instead of the token. Tokens are random strings of high entropy
// (brokerctl token new makes 256-bit ones), so an unsalted fast hash is
// enough: there is no dictionary to try.
func TokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// TokenEntry maps the hash of one bearer token to an identity.
type TokenEntry struct {
	Identity string
	// SHA256 is the token's hash as TokenHash returns it.
	SHA256 string
}

// tokenTable holds token hashes as raw bytes for constant-time compares.
type tokenTable struct {
	sums       [][sha256.Size]byte
	identities []string
}

func newTokenTable(entries []TokenEntry) (*tokenTable, error) {
	t := &tokenTable{}
	for i, e := range entries {
		raw, err := hex.DecodeString(e.SHA256)
		if err != nil || len(raw) != sha256.Size {
			return nil, fmt.Errorf("token %d: sha256 must be 64 hex digits", i)
		}
		if err := ValidateIdentity(e.Identity); err != nil {
			return nil, fmt.Errorf("token %d: %v", i, err)
		}
		t.sums = append(t.sums, [sha256.Size]byte(raw))
		t.identities = append(t.identities, e.Identity)
	}
	return t, nil
}

// lookup returns the identity of token. It compares against every entry
// whatever it finds, in constant time each, so the time taken says nothing
// about which entry (or how much of one) matched.
func (t *tokenTable) lookup(token string) (string, bool) {
	sum := sha256.Sum256([]byte(token))
	found := -1
	for i := range t.sums {
		if subtle.ConstantTimeCompare(sum[:], t.sums[i][:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return "", false
	}
	return t.identities[found], true
}

// PolicyAuthenticator establishes identities from bearer tokens and TLS
// client certificates, and marks the configured admins.
//
// A call presents either a token (metadata "authorization: Bearer TOKEN")
// or a client certificate that the TLS handshake verified against the
// client CA, never both: one caller with two names would make ownership
// ambiguous. A certificate's identity is its first URI SAN (a SPIFFE ID,
// spiffe://trust-domain/path), else its subject CN.
type PolicyAuthenticator struct {
	tokens *tokenTable
	admins map[string]bool
}

var _ Authenticator = (*PolicyAuthenticator)(nil)

// NewPolicyAuthenticator checks the token table and the admin names.
func NewPolicyAuthenticator(tokens []TokenEntry, admins []string) (*PolicyAuthenticator, error) {
	tt, err := newTokenTable(tokens)
	if err != nil {
		return nil, err
	}
	a := &PolicyAuthenticator{tokens: tt, admins: make(map[string]bool, len(admins))}
	for _, name := range admins {
		if err := ValidateIdentity(name); err != nil {
			return nil, fmt.Errorf("admin %q: %v", name, err)
		}
		a.admins[name] = true
	}
	return a, nil
}

// Authenticate implements Authenticator. Its errors say what was missing
// or wrong and never echo a token.
func (a *PolicyAuthenticator) Authenticate(ctx context.Context) (Identity, error) {
	certName, hasCert, err := certIdentity(ctx)
	if err != nil {
		return Identity{}, err
	}
	token, hasToken, err := bearerToken(ctx)
	if err != nil {
		return Identity{}, err
	}
	var name string
	switch {
	case hasToken && hasCert:
		return Identity{}, errors.New("both a client certificate and a bearer token were presented; use one")
	case hasToken:
		var ok bool
		if name, ok = a.tokens.lookup(token); !ok {
			return Identity{}, errors.New("bearer token not recognised")
		}
	case hasCert:
		name = certName
	default:
		return Identity{}, errors.New("no credentials: present a client certificate or a bearer token (authorization: Bearer TOKEN)")
	}
	return Identity{Name: name, Admin: a.admins[name]}, nil
}

// bearerToken reads the authorization metadata.
func bearerToken(ctx context.Context) (token string, ok bool, err error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	switch len(vals) {
	case 0:
		return "", false, nil
	case 1:
	default:
		return "", false, errors.New("more than one authorization header")
	}
	scheme, tok, found := strings.Cut(vals[0], " ")
	if !found || !strings.EqualFold(scheme, "bearer") || tok == "" {
		return "", false, errors.New("authorization header must be \"Bearer TOKEN\"")
	}
	return tok, true, nil
}

// certIdentity returns the identity of the verified client certificate of
// the connection, if there is one. Only a chain the handshake verified
// counts: an unverified certificate (possible when the client CA is
// optional) names nobody.
func certIdentity(ctx context.Context) (string, bool, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", false, nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return "", false, nil
	}
	name := CertificateIdentity(info.State.VerifiedChains[0][0])
	if err := ValidateIdentity(name); err != nil {
		return "", false, fmt.Errorf("client certificate names no usable identity: %v", err)
	}
	return name, true, nil
}

// CertificateIdentity is the identity a client certificate stands for: its
// first URI SAN, else its subject CN ("" when it has neither).
func CertificateIdentity(c *x509.Certificate) string {
	if len(c.URIs) > 0 {
		return c.URIs[0].String()
	}
	return c.Subject.CommonName
}

// PolicyAuthorizer enforces the configured policy: AdminService for
// admins only; a role is issued only to the identities its allow-list
// matches; a lease is touched by its owner or an admin.
//
// Admins are not implicitly allowed to issue: running the broker and
// holding database credentials are separate privileges, and a role's
// allow-list is the one place that says who gets the latter.
type PolicyAuthorizer struct {
	allowed map[string][]string
}

var _ Authorizer = (*PolicyAuthorizer)(nil)

// NewPolicyAuthorizer takes each role's allow-list: identities or
// path.Match globs ("spiffe://prod/ns/payments/*", "svc-*"); '*' does not
// cross '/'. A role with no list can be issued by no one.
func NewPolicyAuthorizer(allowed map[string][]string) (*PolicyAuthorizer, error) {
	a := &PolicyAuthorizer{allowed: make(map[string][]string, len(allowed))}
	for role, globs := range allowed {
		for _, g := range globs {
			if err := ValidateGlob(g); err != nil {
				return nil, fmt.Errorf("role %s: %w", role, err)
			}
		}
		a.allowed[role] = append([]string(nil), globs...)
	}
	return a, nil
}

// ValidateGlob reports whether g is a usable allow-list entry.
func ValidateGlob(g string) error {
	if err := ValidateIdentity(g); err != nil {
		return fmt.Errorf("pattern %q: %v", g, err)
	}
	if _, err := path.Match(g, ""); err != nil {
		return fmt.Errorf("pattern %q: %v", g, err)
	}
	return nil
}

// AuthorizeAdmin allows admins only.
func (a *PolicyAuthorizer) AuthorizeAdmin(id Identity) error {
	return OwnerAuthorizer{}.AuthorizeAdmin(id)
}

// AuthorizeLease allows admins and the lease's owner.
func (a *PolicyAuthorizer) AuthorizeLease(id Identity, l broker.Lease) error {
	return OwnerAuthorizer{}.AuthorizeLease(id, l)
}

// AuthorizeIssue allows id if an entry of the role's allow-list matches
// it. The denial reads the same for a role that does not exist, so that
// a caller cannot probe for role names it may not use.
func (a *PolicyAuthorizer) AuthorizeIssue(id Identity, role string) error {
	if id.Name != "" {
		for _, g := range a.allowed[role] {
			if ok, _ := path.Match(g, id.Name); ok {
				return nil
			}
		}
	}
	return fmt.Errorf("identity %q may not issue role %q: %w", id.Name, role, broker.ErrPermissionDenied)
}
