package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/internal/buildinfo"
	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/store/etcd"
)

// groupLeader is the leadership of a brokerd in a broker group on etcd
// (store.etcd): etcd's election (store/etcd.Leadership), plus what the
// daemon does when it changes: log it, audit it, and set
// credbroker_is_leader. The broker campaigns through it.
type groupLeader struct {
	*etcd.Leadership
	store  *etcd.Store
	prefix string
	log    *slog.Logger
	// audit and metrics are set once Start has opened them, before the
	// broker campaigns.
	audit   *audit.Log
	metrics *metricsServer

	mu      sync.Mutex
	leading bool
	since   time.Time // when the current (or last) term began
	ended   time.Time // when the last term ended
	fence   broker.Fence
	// closing is set when brokerd shuts down: the term it ends then is
	// handed over (resigned), not lost.
	closing bool
}

// handOver marks the shutdown: a term that ends from now on was resigned.
func (g *groupLeader) handOver() {
	g.mu.Lock()
	g.closing = true
	g.mu.Unlock()
}

var _ broker.Leadership = (*groupLeader)(nil)

// newGroupLeader registers this brokerd in its group (instance, the gRPC
// address it serves, its version and start time) on a session of
// store.etcd.session_ttl.
func newGroupLeader(ctx context.Context, cfg *config.Config, s *etcd.Store, addr string, started time.Time, log *slog.Logger) (*groupLeader, error) {
	l, err := etcd.NewLeadership(ctx, s, etcd.LeadershipOptions{
		Member: etcd.Member{
			Name:      cfg.Instance,
			Address:   addr,
			Version:   buildinfo.Read().Version,
			StartTime: started,
		},
		SessionTTL: cfg.Store.Etcd.SessionTTL,
		Logger:     log,
	})
	if err != nil {
		return nil, fmt.Errorf("instance: %w", err)
	}
	return &groupLeader{Leadership: l, store: s, prefix: cfg.Store.Etcd.Prefix, log: log}, nil
}

// Campaign is etcd's, with the change of leadership logged, audited and
// shown in credbroker_is_leader until the term ends.
func (g *groupLeader) Campaign(ctx context.Context) (broker.Term, error) {
	t, err := g.Leadership.Campaign(ctx)
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.fence = t.Fence()
	g.mu.Unlock()
	g.changed(true)
	go func() {
		<-t.Done()
		g.changed(false)
	}()
	return t, nil
}

func (g *groupLeader) changed(leading bool) {
	g.mu.Lock()
	g.leading = leading
	if leading {
		g.since = time.Now()
	} else {
		g.ended = time.Now()
	}
	since, closing := g.since, g.closing
	g.mu.Unlock()
	name := g.Member().Name
	ledFor := time.Since(since).Round(time.Millisecond)
	var msg string
	switch {
	case leading:
		msg = fmt.Sprintf("instance %s leads broker group %s: it runs expiry, reconciliation, disconnect revocations and the purge", name, g.prefix)
		g.log.Info("leadership acquired", "instance", name, "prefix", g.prefix)
	case closing:
		msg = fmt.Sprintf("instance %s handed over the lead of broker group %s at shutdown (led for %s)", name, g.prefix, ledFor)
		g.log.Info("leadership handed over at shutdown", "instance", name, "prefix", g.prefix, "led_for", ledFor.String())
	default:
		msg = fmt.Sprintf("instance %s no longer leads broker group %s (led for %s)", name, g.prefix, ledFor)
		g.log.Warn("leadership lost", "instance", name, "prefix", g.prefix, "led_for", ledFor.String())
	}
	if g.metrics != nil {
		g.metrics.m.SetLeader(leading)
	}
	if g.audit != nil {
		outcome := audit.OutcomeOK
		if !leading && !closing {
			outcome = audit.OutcomeError
		}
		g.audit.Record(audit.Record{Event: audit.EventLeader, Outcome: outcome, Message: msg})
	}
}

// Leading reports whether this brokerd leads its group now, and since when.
func (g *groupLeader) Leading() (bool, time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.leading, g.since
}

// ready is /readyz's leadership check: the group has a leader (this
// brokerd or another), and whether it is this one.
func (g *groupLeader) ready(ctx context.Context) (bool, error) {
	st, err := g.store.GroupStatus(ctx)
	if err != nil {
		return false, err
	}
	if st.Leader == "" {
		return false, etcd.ErrNoLeader
	}
	leading, _ := g.Leading()
	return leading, nil
}

// leaderOnlyRotator refuses root rotations on a brokerd that does not
// lead its group: rotation is the leader's work, like the rest of the
// background work, so two instances never rotate one target at once.
type leaderOnlyRotator struct {
	server.RootRotator
	leader *groupLeader
}

func (r leaderOnlyRotator) RotateRoot(ctx context.Context, target string) (server.RootRotation, error) {
	if leading, _ := r.leader.Leading(); !leading {
		who := "no instance leads it right now"
		if st, err := r.leader.store.GroupStatus(ctx); err == nil && st.Leader != "" {
			for _, m := range st.Members {
				if m.Name == st.Leader {
					who = fmt.Sprintf("ask its leader, instance %s at %s", m.Name, m.Address)
				}
			}
		}
		return server.RootRotation{}, fmt.Errorf("%w: instance %s does not lead broker group %s; %s",
			broker.ErrNotLeader, r.leader.Member().Name, r.leader.prefix, who)
	}
	return r.RootRotator.RotateRoot(ctx, target)
}

// GroupStatus answers AdminService.GetStatus (server.StatusSource): the
// etcd group's registered instances and its leader, or, on bbolt, this
// one instance, which has led since it started.
func (d *Daemon) GroupStatus(ctx context.Context) (server.GroupStatus, error) {
	if d.leader == nil {
		return server.GroupStatus{
			Store: "bbolt", Self: d.cfg.Instance, Leader: d.cfg.Instance, LeaderSince: d.started,
			Instances: []server.InstanceStatus{{
				Name: d.cfg.Instance, Address: d.lis.Addr().String(),
				Version: buildinfo.Read().Version, StartTime: d.started,
			}},
		}, nil
	}
	st, err := d.leader.store.GroupStatus(ctx)
	if err != nil {
		return server.GroupStatus{}, err
	}
	out := server.GroupStatus{Store: "etcd", Self: d.leader.Member().Name, Leader: st.Leader, LeaderSince: st.LeaderSince}
	for _, m := range st.Members {
		out.Instances = append(out.Instances, server.InstanceStatus{Name: m.Name, Address: m.Address, Version: m.Version, StartTime: m.StartTime})
	}
	return out, nil
}
