package broker_test

import (
	"testing"

	"github.com/credbroker/credbroker/broker"
)

func TestUnitNewPassword(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		p := broker.NewPassword()
		if len(p) != 32 {
			t.Fatalf("password of %d characters, want 32", len(p))
		}
		for _, c := range p {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
				t.Fatalf("password %q has %q, outside [A-Za-z0-9]", p, c)
			}
		}
		if seen[p] {
			t.Fatalf("password %q drawn twice", p)
		}
		seen[p] = true
	}
}
