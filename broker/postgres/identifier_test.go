package postgres_test

import (
	"regexp"
	"strings"
	"testing"

	"github.com/credbroker/credbroker/broker/postgres"
)

func TestValidIdentifier(t *testing.T) {
	tests := []struct {
		in string
		ok bool
	}{
		{"read_only_role", true},
		{"_x", true},
		{"a1", true},
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false}, // PostgreSQL would truncate it
		{"", false},
		{"ReadOnly", false}, // needs quoting to keep its case
		{"1abc", false},
		{"pg_monitor", false},
		{"public", false},
		{"none", false},
		{"read-only", false},
		{`a"b`, false},
		{"a;b", false},
		{"a b", false},
		{"a$b", false},
		{"é", false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			err := postgres.ValidIdentifier(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("ValidIdentifier(%q) = %v, want ok %v", tt.in, err, tt.ok)
			}
		})
	}
}

func TestValidPassword(t *testing.T) {
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"alphanumeric", "Abc123xyz", true},
		{"printable punctuation", `p@ss w0rd!"'\`, true},
		{"empty", "", false},
		{"non-ascii", "pässword", false},
		{"control character", "pass\x00word", false},
		{"newline", "pass\nword", false},
		{"too long", strings.Repeat("a", 1025), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := postgres.ValidPassword(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("ValidPassword = %v, want ok %v", err, tt.ok)
			}
			if err != nil && tt.in != "" && strings.Contains(err.Error(), tt.in) {
				t.Fatalf("the error repeats the password: %v", err)
			}
		})
	}
}

var verifierFormat = regexp.MustCompile(`^SCRAM-SHA-256\$4096:[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=:[A-Za-z0-9+/]{43}=$`)

func TestScramSHA256Verifier(t *testing.T) {
	t.Run("known answer", func(t *testing.T) {
		// Computed independently with Python's hashlib/hmac for
		// password "pencil", salt 00 01 .. 0f, 4096 iterations.
		const want = "SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$zHCdol2044/ZyWzPLi7oxApCkamKw9Z+E4U/QApd/5Y=:dd5peBOitVnLNFu7VmwP+HiDaaw4OUCv396eVCWhYiE="
		salt := make([]byte, 16)
		for i := range salt {
			salt[i] = byte(i)
		}
		got, err := postgres.ScramVerifierWithSalt("pencil", salt, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	})
	t.Run("format and fresh salt", func(t *testing.T) {
		a, err := postgres.ScramSHA256Verifier("secret-password")
		if err != nil {
			t.Fatal(err)
		}
		b, err := postgres.ScramSHA256Verifier("secret-password")
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range []string{a, b} {
			if !verifierFormat.MatchString(v) {
				t.Errorf("verifier %q does not have PostgreSQL's format", v)
			}
			if strings.Contains(v, "secret-password") {
				t.Errorf("verifier contains the password")
			}
		}
		if a == b {
			t.Error("two verifiers of one password are equal: the salt is not random")
		}
	})
	t.Run("invalid password", func(t *testing.T) {
		if _, err := postgres.ScramSHA256Verifier(""); err == nil {
			t.Fatal("empty password accepted")
		}
	})
}

func TestAdminSetupSQL(t *testing.T) {
	stmts, err := postgres.AdminSetupSQL(postgres.SetupParams{
		Admin:         "broker_admin",
		AdminPassword: "cleartext-admin-pw",
		ProxyRoles:    []string{"read_only_role", "updater_role"},
		ServerVersion: 15,
	})
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(stmts, ";\n")
	for _, want := range []string{
		`CREATE ROLE "credbroker_managed" NOLOGIN`,
		`CREATE ROLE "broker_admin" LOGIN CREATEROLE NOSUPERUSER`,
		`PASSWORD 'SCRAM-SHA-256$4096:`,
		`GRANT "read_only_role" TO "broker_admin" WITH ADMIN OPTION`,
		`GRANT "updater_role" TO "broker_admin" WITH ADMIN OPTION`,
		`GRANT "credbroker_managed" TO "broker_admin" WITH ADMIN OPTION`,
		`GRANT pg_signal_backend TO "broker_admin"`,
	} {
		if !strings.Contains(all, want) {
			t.Errorf("setup SQL lacks %q:\n%s", want, all)
		}
	}
	if strings.Contains(all, "cleartext-admin-pw") {
		t.Errorf("setup SQL contains the cleartext password")
	}
	if strings.Contains(all, "SUPERUSER,") || strings.Contains(all, " SUPERUSER ") {
		t.Errorf("setup SQL grants SUPERUSER:\n%s", all)
	}
	none, err := postgres.AdminSetupSQL(postgres.SetupParams{Admin: "a", MarkerRole: "m"})
	if err != nil || strings.Contains(strings.Join(none, ";"), "PASSWORD") {
		t.Errorf("no password given: %v, %v; want no PASSWORD clause and no error", none, err)
	}
	// A password PostgreSQL clients would hash differently is an error,
	// not a panic.
	if _, err := postgres.AdminSetupSQL(postgres.SetupParams{Admin: "a", AdminPassword: "p\x00w"}); err == nil {
		t.Error("an admin password with a NUL byte was accepted")
	} else if strings.Contains(err.Error(), "p\x00w") {
		t.Errorf("the error echoes the password: %v", err)
	}
}
