package server

import (
	"context"
	"errors"
	"testing"

	"github.com/credbroker/credbroker/broker"
)

// TestLiveQuotasApplyToTheNextIssue: a rate limit set, changed and
// removed through LiveQuotas applies at the next admit, to an identity
// whose limiter exists already.
func TestLiveQuotasApplyToTheNextIssue(t *testing.T) {
	live := NewLiveQuotas(Quotas{})
	k := newQuotaKeeper(Quotas{}, live, nil)
	ctx := context.Background()
	admit := func() error {
		release, err := k.admit(ctx, "svc", roleReadOnly)
		if err == nil {
			release()
		}
		return err
	}
	for i := range 3 {
		if err := admit(); err != nil {
			t.Fatalf("admit %d without quotas: %v", i, err)
		}
	}
	live.Set(Quotas{IssueRate: 0.001, IssueBurst: 1})
	if err := admit(); err != nil {
		t.Fatalf("first admit under a rate limit: %v", err)
	}
	if err := admit(); !errors.Is(err, broker.ErrResourceExhausted) {
		t.Fatalf("second admit under 0.001/s burst 1: err = %v, want ErrResourceExhausted", err)
	}
	// A larger burst takes effect on the limiter the identity has.
	live.Set(Quotas{IssueRate: 0.001, IssueBurst: 3})
	if got := k.limiter(live.Get(), "svc").Burst(); got != 3 {
		t.Errorf("limiter burst after reload = %d, want 3", got)
	}
	live.Set(Quotas{})
	if err := admit(); err != nil {
		t.Fatalf("admit after the rate limit was removed: %v", err)
	}
}
