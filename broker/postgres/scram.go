package postgres

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
)

const (
	// DefaultScramIterations is the iteration count of the verifiers the
	// engine makes (targets[].scram_iterations): PostgreSQL's own default
	// scram_iterations, and what scanners expect. For the broker's 256-bit
	// random passwords the count adds nothing against guessing
	// (docs/security.md).
	DefaultScramIterations = 4096
	// MinScramIterations and MaxScramIterations bound
	// targets[].scram_iterations. PostgreSQL accepts any count from 1
	// (its scram_iterations GUC ranges 1..INT_MAX); above ten million one
	// verifier costs seconds of CPU, which no deployment wants.
	MinScramIterations = 1
	MaxScramIterations = 10_000_000
	scramSaltLen       = 16
)

// ValidScramIterations reports whether n is a count the engine accepts.
func ValidScramIterations(n int) error {
	if n < MinScramIterations || n > MaxScramIterations {
		return fmt.Errorf("scram iterations %d outside %d..%d", n, MinScramIterations, MaxScramIterations)
	}
	return nil
}

// ScramSHA256Verifier hashes password into the verifier PostgreSQL stores
// in pg_authid.rolpassword:
//
//	SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>
//
// (RFC 5802/7677, standard base64, a fresh random 16-byte salt). PostgreSQL
// stores a value in this form as is, so `CREATE ROLE ... PASSWORD
// '<verifier>'` never sends the cleartext to the server, where a failing
// statement would be logged in full. The password must pass ValidPassword.
func ScramSHA256Verifier(password string) (string, error) {
	return ScramSHA256VerifierIter(password, DefaultScramIterations)
}

// ScramSHA256VerifierIter is ScramSHA256Verifier with iterations rounds
// (ValidScramIterations).
func ScramSHA256VerifierIter(password string, iterations int) (string, error) {
	if err := ValidScramIterations(iterations); err != nil {
		return "", err
	}
	salt := make([]byte, scramSaltLen)
	_, _ = rand.Read(salt) // never fails (crypto/rand crashes the program instead)
	return scramVerifier(password, salt, iterations)
}

func scramVerifier(password string, salt []byte, iterations int) (string, error) {
	if err := ValidPassword(password); err != nil {
		return "", err
	}
	salted, err := pbkdf2.Key(sha256.New, password, salt, iterations, sha256.Size)
	if err != nil {
		return "", fmt.Errorf("scram: %w", err)
	}
	clientKey := hmacSHA256(salted, "Client Key")
	storedKey := sha256.Sum256(clientKey)
	serverKey := hmacSHA256(salted, "Server Key")
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", iterations, b64(salt), b64(storedKey[:]), b64(serverKey)), nil
}

func hmacSHA256(key []byte, msg string) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(msg))
	return h.Sum(nil)
}
