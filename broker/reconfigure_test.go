package broker_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// TestUnitReconfigureAppliesToTheNextCall: a reload's roles and settings
// apply to the next issue; a removed role is refused to new issues while
// its live lease keeps its expiry and still renews; an invalid
// configuration changes nothing.
func TestUnitReconfigureAppliesToTheNextCall(t *testing.T) {
	u := newUnit(t)
	ctx := context.Background()
	before, _ := u.issue(roleRO, 0, "svc")
	if got := before.ExpireTime.Sub(before.IssueTime); got != 15*time.Minute {
		t.Fatalf("first lease TTL = %v, want 15m", got)
	}

	cfg := broker.Config{
		Roles: []broker.Role{
			{Name: roleUpdater, Target: "main", ProxyRole: "updater_role", DefaultTTL: 5 * time.Minute, MaxTTL: 10 * time.Minute},
			{Name: "reporting", Target: "main", ProxyRole: "read_only_role", DefaultTTL: time.Minute, MaxTTL: time.Hour},
		},
		RetryBaseDelay: time.Second, RetryMaxDelay: 8 * time.Second, RevokeRetries: 3,
	}
	if err := u.b.Reconfigure(cfg); err != nil {
		t.Fatalf("Reconfigure: %v", err)
	}
	l, _ := u.issue(roleUpdater, 0, "svc")
	if got := l.ExpireTime.Sub(l.IssueTime); got != 5*time.Minute {
		t.Errorf("updater TTL after reload = %v, want the new default 5m", got)
	}
	if got := l.MaxExpireTime.Sub(l.IssueTime); got != 10*time.Minute {
		t.Errorf("updater max TTL after reload = %v, want 10m", got)
	}
	if _, _, err := u.b.Issue(ctx, broker.IssueRequest{Role: roleRO, Client: "svc"}); !errors.Is(err, broker.ErrRoleNotFound) {
		t.Errorf("issue of the removed role: err = %v, want ErrRoleNotFound", err)
	}
	u.issue("reporting", 0, "svc")

	// The removed role's lease keeps its expiry, and renews within its own max.
	if got := u.lease(before.ID); !got.ExpireTime.Equal(before.ExpireTime) || got.State != broker.StateActive {
		t.Errorf("removed role's lease changed: expire %v state %v, want %v active", got.ExpireTime, got.State, before.ExpireTime)
	}
	renewed, err := u.b.Renew(ctx, before.ID, 30*time.Minute)
	if err != nil {
		t.Fatalf("renew the removed role's lease: %v", err)
	}
	if !renewed.ExpireTime.After(before.ExpireTime) || renewed.ExpireTime.After(before.MaxExpireTime) {
		t.Errorf("renewed expire %v: want after %v and not after max %v", renewed.ExpireTime, before.ExpireTime, before.MaxExpireTime)
	}

	bad := cfg
	bad.Roles = append([]broker.Role{{Name: "nowhere", Target: "other", ProxyRole: "x", DefaultTTL: time.Minute, MaxTTL: time.Minute}}, cfg.Roles...)
	if err := u.b.Reconfigure(bad); err == nil {
		t.Fatal("Reconfigure with a role on an unknown target succeeded")
	}
	if got := u.b.Roles(); len(got) != 2 || got[0].Name != "reporting" || got[1].Name != roleUpdater {
		t.Errorf("roles after a refused reload = %+v, want reporting and updater unchanged", got)
	}
}
