package broker

import (
	"crypto/rand"
	"encoding/base32"
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"
)

// Lease ids are 160 random bits in lower-case base32: unguessable,
// URL-safe, and of one fixed shape so that anything else is rejected
// before it reaches the store.
const leaseIDLen = 32

var leaseIDEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

func newLeaseID() string {
	var b [20]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux (Go 1.24+ panics instead)
	return leaseIDEncoding.EncodeToString(b[:])
}

// NewGroupID returns a new broker group identity (see
// LeaseStore.GroupID): 160 random bits in the lease ids' alphabet, so it
// is safe in a PostgreSQL comment, a file and an etcd key alike.
func NewGroupID() string { return newLeaseID() }

// ValidateLeaseID reports whether id has the shape of a lease id, wrapping
// ErrInvalidArgument otherwise. The message never echoes the id: it may be
// anything a caller sent, NUL bytes and all.
func ValidateLeaseID(id string) error {
	if id == "" {
		return fmt.Errorf("%w: lease_id is required", ErrInvalidArgument)
	}
	if len(id) != leaseIDLen {
		return fmt.Errorf("%w: lease_id must be %d characters of [a-z2-7], got %d bytes", ErrInvalidArgument, leaseIDLen, len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return fmt.Errorf("%w: lease_id must be %d characters of [a-z2-7]", ErrInvalidArgument, leaseIDLen)
		}
	}
	return nil
}

// RoleNamePattern is what a broker role name must match. Role names appear
// inside generated PostgreSQL usernames, so they are short and need no
// quoting.
var RoleNamePattern = regexp.MustCompile(`^[a-z][a-z0-9_]{0,39}$`)

// ValidateRoleName wraps ErrInvalidArgument if name cannot be a role name.
func ValidateRoleName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: role is required", ErrInvalidArgument)
	}
	if !RoleNamePattern.MatchString(name) {
		return fmt.Errorf("%w: role must match %s", ErrInvalidArgument, RoleNamePattern)
	}
	return nil
}

const (
	userAlphabet     = "abcdefghijklmnopqrstuvwxyz0123456789"
	passwordAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	// 32 characters of 62: about 190 bits.
	passwordLen = 32
	// 12 characters of 36: about 62 bits, so two users of one role never
	// collide in practice (and CREATE ROLE would refuse if they did).
	userSuffixLen = 12
)

// newUsername returns "cb_<role>_<random>": it shows the role, fits in
// PostgreSQL's 63-byte names (role names are at most 40 bytes), and uses
// only characters that need no quoting.
func newUsername(role string) string {
	return "cb_" + role + "_" + randomString(userAlphabet, userSuffixLen)
}

// NewPassword returns a random password: 32 characters of [A-Za-z0-9],
// about 190 bits, safe unquoted in SQL string literals, connection strings
// and shells. Issued users get one; so may anything else that needs a
// password of the same strength (the targets' admin password rotation).
func NewPassword() string { return randomString(passwordAlphabet, passwordLen) }

// randomString draws n characters uniformly from alphabet (rejection
// sampling, so no character is more likely than another).
func randomString(alphabet string, n int) string {
	limit := byte(256 - 256%len(alphabet))
	out := make([]byte, 0, n)
	var buf [64]byte
	for len(out) < n {
		_, _ = rand.Read(buf[:])
		for _, c := range buf {
			if c < limit && len(out) < n {
				out = append(out, alphabet[int(c)%len(alphabet)])
			}
		}
	}
	return string(out)
}

// Metadata limits: metadata is stored with every lease and shown to admins,
// so it is kept small and printable.
const (
	MaxMetadataEntries    = 32
	MaxMetadataKeyBytes   = 64
	MaxMetadataValueBytes = 512
	MaxMetadataTotalBytes = 4096
)

var metadataKeyPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-/]*$`)

// ValidateMetadata wraps ErrInvalidArgument if md breaks a limit. Messages
// name the offending key only when the key itself is well-formed.
func ValidateMetadata(md map[string]string) error {
	if len(md) > MaxMetadataEntries {
		return fmt.Errorf("%w: metadata has %d entries, at most %d are allowed", ErrInvalidArgument, len(md), MaxMetadataEntries)
	}
	total := 0
	for k, v := range md {
		if len(k) > MaxMetadataKeyBytes || !metadataKeyPattern.MatchString(k) {
			return fmt.Errorf("%w: metadata keys must be 1-%d bytes of [A-Za-z0-9_.-/] starting with a letter or digit", ErrInvalidArgument, MaxMetadataKeyBytes)
		}
		if len(v) > MaxMetadataValueBytes {
			return fmt.Errorf("%w: metadata[%s] is %d bytes, at most %d are allowed", ErrInvalidArgument, k, len(v), MaxMetadataValueBytes)
		}
		if !utf8.ValidString(v) || strings.ContainsFunc(v, isControl) {
			return fmt.Errorf("%w: metadata[%s] must be valid UTF-8 without control characters", ErrInvalidArgument, k)
		}
		total += len(k) + len(v)
	}
	if total > MaxMetadataTotalBytes {
		return fmt.Errorf("%w: metadata is %d bytes in all, at most %d are allowed", ErrInvalidArgument, total, MaxMetadataTotalBytes)
	}
	return nil
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) }
