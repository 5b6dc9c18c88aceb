package config

import (
	"fmt"
	"math"
	"os"
	"regexp"
	"strconv"
	"strings"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/server"
)

// Security is the validated security configuration: who may call
// (TLS, tokens), what they may do (admins, role allow-lists), how much
// (quotas), and where it is recorded (audit).
type Security struct {
	// TLS is nil for plaintext (loopback or unix socket only).
	TLS *TLS
	// Tokens are the accepted bearer tokens, as hashes.
	Tokens []Token
	Admins []string
	// Allowed maps each role to the identities (globs) that may issue it.
	Allowed map[string][]string
	Quotas  Quotas
	Audit   Audit
}

// Token is one accepted bearer token: never the token itself, its hash.
type Token struct {
	Identity string
	// SHA256 is the token's SHA-256 in lower-case hex.
	SHA256 string
}

// Quotas bound what one caller may hold and how fast it may ask; zero
// means no limit.
type Quotas struct {
	// IdentityMaxActive caps the active leases of one identity.
	IdentityMaxActive int
	// RoleMaxActive caps the active leases of a broker role.
	RoleMaxActive map[string]int
	// IssueRate is issues per second per identity, IssueBurst its burst.
	IssueRate  float64
	IssueBurst int
}

// Enabled reports whether callers are authenticated. Without tls and
// tokens, brokerd keeps its loopback behaviour: every caller is the local
// admin (server.LocalAuthenticator), which is what `brokerd dev` relies on.
func (s Security) Enabled() bool { return s.TLS != nil || len(s.Tokens) > 0 }

// TLS names the server's PEM files (absolute paths).
type TLS struct {
	CertFile     string
	KeyFile      string
	ClientCAFile string
}

// Audit configures the audit log; Path "" means none.
type Audit struct {
	Path string
	// HMACKeyFile holds the key that chains the records ("" for none);
	// it is read when brokerd starts (package rootcred checks it).
	HMACKeyFile string
	// HMACKeySource says where the key comes from, for logs.
	HMACKeySource string
	// Required refuses calls that cannot be audited (server.Config.AuditRequired).
	Required bool
}

// MinHMACKeyBytes: shorter audit keys can be guessed offline from the file.
const MinHMACKeyBytes = 16

var hexSHA256 = regexp.MustCompile(`^[0-9a-f]{64}$`)

func (v *validator) security(f *File, roles []broker.Role) Security {
	var s Security
	if f.TLS != nil {
		p := "tls"
		t := &TLS{}
		if f.TLS.CertFile == "" {
			v.errorf(p+".cert_file", "required (the server certificate, PEM)")
		} else {
			t.CertFile = v.readableFile(p+".cert_file", f.path(f.TLS.CertFile))
		}
		if f.TLS.KeyFile == "" {
			v.errorf(p+".key_file", "required (the server's private key, PEM)")
		} else {
			t.KeyFile = v.readableFile(p+".key_file", f.path(f.TLS.KeyFile))
			v.privateFile(p+".key_file", t.KeyFile)
		}
		if f.TLS.ClientCAFile != "" {
			t.ClientCAFile = v.readableFile(p+".client_ca_file", f.path(f.TLS.ClientCAFile))
		}
		// The files are loaded where they are served (package server), and
		// by `brokerd check`, which finds a key that does not match its
		// certificate before a restart does.
		s.TLS = t
	}

	seenHash := map[string]int{}
	for i, tf := range f.Tokens {
		p := fmt.Sprintf("tokens[%d]", i)
		if err := server.ValidateIdentity(tf.Identity); err != nil {
			v.errorf(p+".identity", "%v", err)
		}
		// The value is never echoed: an operator who pasted the token
		// itself here must not find it copied into a log as well.
		switch {
		case tf.SHA256 == "":
			v.errorf(p+".sha256", "required (the token's SHA-256 in hex: brokerctl token hash < token-file)")
			continue
		case !hexSHA256.MatchString(tf.SHA256):
			v.errorf(p+".sha256", "must be 64 lower-case hex digits, the SHA-256 of the token (brokerctl token hash < token-file), never the token itself")
			continue
		}
		if j, dup := seenHash[tf.SHA256]; dup {
			v.errorf(p+".sha256", "the same token as tokens[%d]; one token must map to one identity", j)
			continue
		}
		seenHash[tf.SHA256] = i
		s.Tokens = append(s.Tokens, Token(tf))
	}
	if len(f.Tokens) > 0 && f.TLS == nil {
		v.warnf("tokens", "bearer tokens travel in plaintext without tls; acceptable on loopback or a unix socket only")
	}
	if f.TLS != nil && f.TLS.ClientCAFile == "" && len(f.Tokens) == 0 {
		v.errorf("tls", "no way to authenticate callers: set tls.client_ca_file (mutual TLS) or tokens")
	}

	for i, a := range f.Admins {
		if err := server.ValidateIdentity(a); err != nil {
			v.errorf(fmt.Sprintf("admins[%d]", i), "%v", err)
		}
	}
	s.Admins = append(s.Admins, f.Admins...)

	enabled := f.TLS != nil || len(f.Tokens) > 0
	if !enabled && len(f.Admins) > 0 {
		v.warnf("admins", "ignored without tls or tokens: every caller on loopback is the local admin")
	}
	s.Allowed = map[string][]string{}
	s.Quotas.RoleMaxActive = map[string]int{}
	for i, rf := range f.Roles {
		p := fmt.Sprintf("roles[%d]", i)
		for j, g := range rf.Allowed {
			if err := server.ValidateGlob(g); err != nil {
				v.errorf(fmt.Sprintf("%s.allowed[%d]", p, j), "%v", err)
			}
		}
		if i < len(roles) && roles[i].Name != "" {
			s.Allowed[roles[i].Name] = append([]string(nil), rf.Allowed...)
			if rf.MaxActiveLeases != nil {
				s.Quotas.RoleMaxActive[roles[i].Name] = v.positiveInt(p+".max_active_leases", rf.MaxActiveLeases, 0)
			}
		}
		switch {
		case enabled && len(rf.Allowed) == 0:
			v.warnf(p+".allowed", "empty: no identity can issue role %q", rf.Name)
		case !enabled && len(rf.Allowed) > 0:
			v.warnf(p+".allowed", "ignored without tls or tokens: every caller on loopback is the local admin")
		}
	}

	if f.Quotas.MaxActivePerIdentity != nil {
		s.Quotas.IdentityMaxActive = v.positiveInt("quotas.max_active_per_identity", f.Quotas.MaxActivePerIdentity, 0)
	}
	if f.Quotas.IssueRatePerIdentity != "" {
		perSec, n, err := ParseRate(f.Quotas.IssueRatePerIdentity)
		if err != nil {
			v.errorf("quotas.issue_rate_per_identity", "%v", err)
		}
		s.Quotas.IssueRate = perSec
		s.Quotas.IssueBurst = v.positiveInt("quotas.issue_burst", f.Quotas.IssueBurst, max(1, n))
	} else if f.Quotas.IssueBurst != nil {
		v.errorf("quotas.issue_burst", "needs quotas.issue_rate_per_identity")
	}

	if f.Audit.Path != "" {
		s.Audit.Path = f.path(f.Audit.Path)
		if fi, err := os.Stat(s.Audit.Path); err == nil && fi.IsDir() {
			v.errorf("audit.path", "%s is a directory; name a file in it", s.Audit.Path)
		}
	}
	if f.Audit.HMACKeyFile != "" {
		if f.Audit.Path == "" {
			v.errorf("audit.hmac_key_file", "needs audit.path")
		}
		s.Audit.HMACKeyFile = f.path(f.Audit.HMACKeyFile)
		s.Audit.HMACKeySource = "file " + s.Audit.HMACKeyFile
	}
	if f.Audit.Required {
		if f.Audit.Path == "" {
			v.errorf("audit.required", "needs audit.path")
		}
		s.Audit.Required = true
	}
	return s
}

// ParseRate parses "N/s", "N/m" or "N/h" (N a positive integer) into
// events per second, and returns N as well (the natural burst).
func ParseRate(raw string) (perSecond float64, n int, err error) {
	num, unit, ok := strings.Cut(raw, "/")
	count, cerr := strconv.Atoi(num)
	var per float64
	switch unit {
	case "s":
		per = 1
	case "m":
		per = 60
	case "h":
		per = 3600
	}
	if !ok || cerr != nil || count <= 0 || per == 0 || count > math.MaxInt32 {
		return 0, 0, fmt.Errorf("%q is not a rate; write N/s, N/m or N/h with N a positive integer (e.g. 30/m)", raw)
	}
	return float64(count) / per, count, nil
}

// readableFile checks that path is a regular file, and returns it. Whether
// it can be read and parsed is found where it is loaded.
func (v *validator) readableFile(p, path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		v.errorf(p, "%v", err)
		return path
	}
	if !fi.Mode().IsRegular() {
		v.errorf(p, "%s is not a regular file", path)
		return path
	}
	return path
}

// privateFile refuses a private key others can write and warns about one
// others can read.
func (v *validator) privateFile(p, path string) {
	fi, err := os.Stat(path)
	if err != nil {
		return
	}
	perm := fi.Mode().Perm()
	switch {
	case perm&0o022 != 0:
		v.errorf(p, "%s is group- or world-writable (mode %04o); run chmod 600 %s", path, perm, path)
	case perm&0o004 != 0:
		v.warnf(p, "%s is world-readable (mode %04o); run chmod 600 %s", path, perm, path)
	}
}
