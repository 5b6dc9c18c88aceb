package credbroker

import (
	"testing"
	"time"
)

// TestDeprecatedReplaceNames: code written against the names of before
// the rename (EventRotated, KeeperOptions.RotateBefore) still works.
func TestDeprecatedReplaceNames(t *testing.T) {
	if EventRotated != EventReplaced {
		t.Errorf("EventRotated = %v, want EventReplaced", EventRotated)
	}
	if got := EventReplaced.String(); got != "replaced" {
		t.Errorf("EventReplaced.String() = %q, want replaced", got)
	}
	c := &Client{}
	for _, tc := range []struct {
		opts KeeperOptions
		want time.Duration
	}{
		{KeeperOptions{RotateBefore: 3 * time.Second}, 3 * time.Second},
		{KeeperOptions{ReplaceBefore: 5 * time.Second}, 5 * time.Second},
		{KeeperOptions{ReplaceBefore: 5 * time.Second, RotateBefore: 3 * time.Second}, 5 * time.Second},
		{KeeperOptions{}, 0},
	} {
		if got := c.NewKeeper(tc.opts).opts.ReplaceBefore; got != tc.want {
			t.Errorf("NewKeeper(%+v): ReplaceBefore %v, want %v", tc.opts, got, tc.want)
		}
	}
}
