package rootcred

import (
	"fmt"
	"log/slog"
)

// Secret holds a password. It prints as "[redacted]" through fmt (every
// verb), slog and encoding/json, so a Config can be logged or dumped
// without leaking it; Reveal returns the value for the one place that
// needs it (the database connection).
type Secret string

const redacted = "[redacted]"

// Reveal returns the secret's value.
func (s Secret) Reveal() string { return string(s) }

// String implements fmt.Stringer.
func (s Secret) String() string { return redacted }

// Format implements fmt.Formatter, so %v, %s, %q, %x and %#v all redact.
func (s Secret) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(redacted)) }

// LogValue implements slog.LogValuer.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalJSON implements json.Marshaler.
func (s Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }

// MarshalText implements encoding.TextMarshaler (YAML, and JSON map keys).
func (s Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
