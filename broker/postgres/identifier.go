package postgres

import (
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// maxIdentifierLen is NAMEDATALEN-1: PostgreSQL silently truncates longer
// names, so a longer name would address a different role than intended.
const maxIdentifierLen = 63

// reservedRoleNames cannot name a role, or mean something else where a role
// name goes (ALTER ROLE ... SET role = none).
var reservedRoleNames = map[string]bool{
	"public": true, "none": true, "current_role": true, "current_user": true, "session_user": true,
}

// ValidIdentifier checks an operator-supplied identifier (proxy role, marker
// role, database): 1 to 63 bytes of [a-z0-9_], not starting with a digit,
// not starting with "pg_" (reserved for PostgreSQL's own roles), and not a
// reserved role name. It is stricter than PostgreSQL on purpose: such names
// mean the same quoted and unquoted, so what an operator writes in SQL and in
// credbroker's configuration cannot silently differ (a role created as
// ReadOnly without quotes is readonly).
func ValidIdentifier(s string) error {
	if err := validName(s); err != nil {
		return err
	}
	if s[0] >= '0' && s[0] <= '9' {
		return fmt.Errorf("identifier %q starts with a digit", s)
	}
	if reservedRoleNames[s] {
		return fmt.Errorf("identifier %q is reserved", s)
	}
	return nil
}

// validUsername checks a broker-generated username. The broker draws names
// from a safe alphabet; this is defence in depth, since CREATE ROLE takes no
// bind parameters.
func validUsername(s string) error {
	if err := validName(s); err != nil {
		return err
	}
	if reservedRoleNames[s] {
		return fmt.Errorf("identifier %q is reserved", s)
	}
	return nil
}

func validName(s string) error {
	if s == "" {
		return errors.New("identifier is empty")
	}
	if len(s) > maxIdentifierLen {
		return fmt.Errorf("identifier %q is longer than %d bytes (PostgreSQL would truncate it)", s, maxIdentifierLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return fmt.Errorf("identifier %q: only lowercase letters, digits and '_' are allowed", s)
		}
	}
	if strings.HasPrefix(s, "pg_") {
		return fmt.Errorf("identifier %q: the pg_ prefix is reserved by PostgreSQL", s)
	}
	return nil
}

// ValidPassword checks a password before it is hashed into a verifier: 1 to
// 1024 bytes of printable ASCII. Clients normalize a password with SASLprep
// before SCRAM; for printable ASCII that is the identity in every client
// (libpq, pgx, JDBC), so a verifier computed here matches what any client
// computes. The error never contains the password.
func ValidPassword(p string) error {
	if p == "" {
		return errors.New("password is empty")
	}
	if len(p) > 1024 {
		return errors.New("password is longer than 1024 bytes")
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] > 0x7e {
			return fmt.Errorf("password has a byte outside printable ASCII at offset %d", i)
		}
	}
	return nil
}

// QuoteIdentifier quotes an identifier for SQL text (pgx.Identifier's
// Sanitize). Validate operator-supplied names with ValidIdentifier first.
func QuoteIdentifier(s string) string { return pgx.Identifier{s}.Sanitize() }

func quoteIdent(s string) string { return QuoteIdentifier(s) }

// quoteLiteral quotes a string literal. standard_conforming_strings is on in
// every supported version, so only ' needs doubling; the values quoted here
// (verifiers, timestamps) contain neither quotes nor backslashes anyway.
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
