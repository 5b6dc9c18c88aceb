package etcd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/credbroker/credbroker/broker"
)

// DefaultSessionTTL is the leadership session's TTL (store.etcd.session_ttl):
// how long a group goes without a leader after its leader dies, and so
// roughly how long a failover takes.
const DefaultSessionTTL = 10 * time.Second

// MinSessionTTL is the shortest session TTL accepted: etcd rounds a lease
// TTL up to whole seconds and to its own minimum (1.5 election timeouts,
// 1.5 s with its defaults), so a shorter one would not mean what it says.
const MinSessionTTL = 2 * time.Second

// Member is one brokerd of a group, as it registers itself under
// P instance/<name> for as long as its session lives.
type Member struct {
	Name      string    `json:"name"`
	Address   string    `json:"address"`
	Version   string    `json:"version"`
	StartTime time.Time `json:"start_time"`
	// Run is a random id of the process: a brokerd re-registering after
	// its session was lost tells its own old key from another brokerd's.
	Run string `json:"run"`
}

// leaderValue is the value of an election key.
type leaderValue struct {
	Instance string `json:"instance"`
	// Since is when the instance won; zero while it only campaigns.
	Since time.Time `json:"since,omitzero"`
}

// GroupStatus is what GetStatus shows of a group: its live members and
// which one leads since when.
type GroupStatus struct {
	Members []Member
	// Leader is the leading member's name; "" when none leads.
	Leader      string
	LeaderSince time.Time
}

// LeadershipOptions configures NewLeadership.
type LeadershipOptions struct {
	// Member describes this brokerd; Name is required and unique in the
	// group.
	Member Member
	// SessionTTL is the session's TTL (DefaultSessionTTL when zero),
	// rounded up to whole seconds.
	SessionTTL time.Duration
	Logger     *slog.Logger
}

// Leadership is the broker.Leadership of a group on etcd: a
// concurrency.Session whose lease has the session TTL, and a
// concurrency.Election on P leader. The session's lease also holds the
// member's registration, so a brokerd that dies leaves the group (and, if
// it led, the election) when its lease expires.
//
// A term ends the moment the session does (its lease expired, or
// keep-alives went unanswered for two thirds of the TTL, so a brokerd cut
// off from etcd stops its work before etcd lets another one lead), or the
// election key goes. Leader-only writes compare the election key's create
// revision (broker.Fence, Store.commit).
type Leadership struct {
	s      *Store
	member Member
	ttl    int // seconds
	log    *slog.Logger

	ctx    context.Context // ends at Close
	cancel context.CancelFunc

	mu      sync.Mutex
	session *session
}

var _ broker.Leadership = (*Leadership)(nil)

// session is one concurrency.Session and its watchdog.
type session struct {
	*concurrency.Session
	// lost is closed when keep-alives went unanswered for too long or the
	// session ended: the lease may be gone on the server.
	lost chan struct{}
}

// NewLeadership registers the member under the group's prefix and
// returns its leadership, not yet campaigning (broker.Broker campaigns).
// A name another live brokerd registered is refused, after waiting up to
// the session TTL for a predecessor that died without leaving.
func NewLeadership(ctx context.Context, s *Store, opts LeadershipOptions) (*Leadership, error) {
	if opts.Member.Name == "" {
		return nil, fmt.Errorf("%w: the instance name is empty", broker.ErrInvalidArgument)
	}
	if opts.SessionTTL <= 0 {
		opts.SessionTTL = DefaultSessionTTL
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	run := make([]byte, 8)
	_, _ = rand.Read(run)
	m := opts.Member
	m.Run = hex.EncodeToString(run)
	lctx, cancel := context.WithCancel(context.Background())
	l := &Leadership{
		s: s, member: m, log: log, ctx: lctx, cancel: cancel,
		ttl: int((opts.SessionTTL + time.Second - 1) / time.Second),
	}
	if _, err := l.currentSession(ctx); err != nil {
		cancel()
		return nil, err
	}
	return l, nil
}

// Member is this brokerd's registration.
func (l *Leadership) Member() Member { return l.member }

// Close ends the session: its lease is revoked, so this member leaves the
// group and, if it led, another is elected at once.
func (l *Leadership) Close() error {
	l.cancel()
	l.mu.Lock()
	s := l.session
	l.session = nil
	l.mu.Unlock()
	if s == nil {
		return nil
	}
	return s.close()
}

func (s *session) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultRequestTimeout)
	defer cancel()
	s.Orphan()
	_, err := s.Client().Revoke(ctx, s.Lease())
	return err
}

// currentSession returns the live session, or makes a new one (and
// registers the member on it) when there is none or it was lost.
func (l *Leadership) currentSession(ctx context.Context) (*session, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ctx.Err() != nil {
		return nil, broker.ErrClosed
	}
	if s := l.session; s != nil {
		select {
		case <-s.lost:
			// Revoke the old lease in the background: if etcd is back it
			// leaves the election at once, else it expires by itself.
			go func() { _ = s.close() }()
			l.session = nil
		default:
			return s, nil
		}
	}
	cli := l.s.cli
	rctx, cancel := l.s.request(ctx)
	grant, err := cli.Grant(rctx, int64(l.ttl))
	cancel()
	if err != nil {
		return nil, fmt.Errorf("etcd session: %w", err)
	}
	cs, err := concurrency.NewSession(cli, concurrency.WithLease(grant.ID), concurrency.WithContext(l.ctx))
	if err != nil {
		return nil, fmt.Errorf("etcd session: %w", err)
	}
	s := &session{Session: cs, lost: make(chan struct{})}
	if err := l.watchdog(s); err != nil {
		_ = s.close()
		return nil, err
	}
	if err := l.register(ctx, s); err != nil {
		_ = s.close()
		return nil, err
	}
	l.session = s
	return s, nil
}

// watchdog closes s.lost when the session ends, or when no keep-alive
// was answered for two thirds of the TTL. The etcd client only gives up on
// a lease after a whole TTL without an answer, by which time etcd itself
// may have expired it and elected another leader; ending the term a third
// of a TTL earlier keeps a cut-off leader from working on while another
// already leads.
func (l *Leadership) watchdog(s *session) error {
	kctx, cancel := context.WithCancel(l.ctx)
	ka, err := s.Client().KeepAlive(kctx, s.Lease())
	if err != nil {
		cancel()
		return fmt.Errorf("etcd session keep-alive: %w", err)
	}
	limit := time.Duration(l.ttl) * time.Second * 2 / 3
	go func() {
		defer close(s.lost)
		defer cancel()
		timer := time.NewTimer(limit)
		defer timer.Stop()
		for {
			select {
			case resp, ok := <-ka:
				if !ok || resp == nil || resp.TTL <= 0 {
					return
				}
				timer.Reset(limit)
			case <-timer.C:
				l.log.Warn("etcd did not answer the leadership session's keep-alives; ending it", "after", limit.String())
				return
			case <-s.Done():
				return
			}
		}
	}()
	return nil
}

// register puts the member's key on s's lease. A key of the same name on
// another brokerd's lease is waited out up to a TTL (a predecessor killed
// without leaving), then refused.
func (l *Leadership) register(ctx context.Context, s *session) error {
	key := l.s.keys.instance(l.member.Name)
	val, err := json.Marshal(l.member)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(time.Duration(l.ttl)*time.Second + 2*time.Second)
	for {
		rctx, cancel := l.s.request(ctx)
		resp, err := l.s.cli.Txn(rctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, string(val), clientv3.WithLease(s.Lease()))).
			Else(clientv3.OpGet(key)).
			Commit()
		cancel()
		if err != nil {
			return fmt.Errorf("etcd register instance %q: %w", l.member.Name, err)
		}
		if resp.Succeeded {
			return nil
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			continue // gone meanwhile
		}
		if clientv3.LeaseID(kvs[0].Lease) == s.Lease() {
			return nil // registered on this session
		}
		var other Member
		_ = json.Unmarshal(kvs[0].Value, &other)
		if other.Run == l.member.Run {
			// Ours, from a session that was lost: move it to this one.
			rctx, cancel := l.s.request(ctx)
			_, err := l.s.cli.Txn(rctx).
				If(clientv3.Compare(clientv3.ModRevision(key), "=", kvs[0].ModRevision)).
				Then(clientv3.OpPut(key, string(val), clientv3.WithLease(s.Lease()))).
				Commit()
			cancel()
			if err != nil {
				return fmt.Errorf("etcd register instance %q: %w", l.member.Name, err)
			}
			continue // and check
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("%w: instance %q is already registered in this broker group by another brokerd (address %s, started %s); "+
				"give each brokerd its own `instance`", broker.ErrExists, l.member.Name, other.Address, other.StartTime.UTC().Format(time.RFC3339))
		}
		l.log.Info("instance name held by an earlier brokerd; waiting for its session to expire", "instance", l.member.Name, "other_address", other.Address)
		wctx, cancel := context.WithDeadline(ctx, deadline)
		waitDelete(wctx, l.s.cli, key, resp.Header.Revision+1)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// waitDelete returns when key is deleted at or after rev, or ctx ends.
func waitDelete(ctx context.Context, cli *clientv3.Client, key string, rev int64) {
	for wr := range cli.Watch(ctx, key, clientv3.WithRev(rev)) {
		for _, ev := range wr.Events {
			if ev.Type == mvccpb.DELETE {
				return
			}
		}
	}
}

// Campaign blocks until this brokerd leads its group (broker.Leadership).
func (l *Leadership) Campaign(ctx context.Context) (broker.Term, error) {
	s, err := l.currentSession(ctx)
	if err != nil {
		return nil, err
	}
	// Campaigning ends with the session: a lost session's key is gone.
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-s.lost:
			cancel()
		case <-cctx.Done():
		}
	}()
	e := concurrency.NewElection(s.Session, l.s.keys.election())
	val, _ := json.Marshal(leaderValue{Instance: l.member.Name})
	if err := e.Campaign(cctx, string(val)); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("etcd campaign: %w", err)
	}
	t := &term{l: l, s: s, e: e, done: make(chan struct{}),
		fence: broker.Fence{Key: e.Key(), Revision: e.Rev()}}
	// Campaign can return after the session's key vanished (it waits only
	// for older keys to go): check it, and announce when this term began.
	since := time.Now()
	val, _ = json.Marshal(leaderValue{Instance: l.member.Name, Since: since})
	rctx, rcancel := l.s.request(ctx)
	err = e.Proclaim(rctx, string(val))
	rcancel()
	if err != nil {
		t.end()
		return nil, fmt.Errorf("etcd campaign: after winning: %w", err)
	}
	t.since = since
	go t.follow(e.Header().GetRevision() + 1)
	return t, nil
}

// term is one leadership term on etcd (broker.Term).
type term struct {
	l     *Leadership
	s     *session
	e     *concurrency.Election
	fence broker.Fence
	since time.Time

	once sync.Once
	done chan struct{}
}

func (t *term) Done() <-chan struct{} { return t.done }
func (t *term) Fence() broker.Fence   { return t.fence }

// Since is when the term began.
func (t *term) Since() time.Time { return t.since }

func (t *term) end() { t.once.Do(func() { close(t.done) }) }

// follow ends the term when the session is lost or the election key is
// deleted (its lease expired or was revoked, or an operator deleted it).
func (t *term) follow(fromRev int64) {
	wctx, cancel := context.WithCancel(t.l.ctx)
	defer cancel()
	defer t.end()
	wch := t.l.s.cli.Watch(wctx, t.fence.Key, clientv3.WithRev(fromRev))
	for {
		select {
		case <-t.s.lost:
			return
		case <-t.done:
			return
		case wr, ok := <-wch:
			if !ok || wr.Err() != nil {
				// The watch broke (compaction, closing): leadership can no
				// longer be followed, so it is given up.
				return
			}
			for _, ev := range wr.Events {
				if ev.Type == mvccpb.DELETE {
					return
				}
			}
		}
	}
}

// Confirm checks, with a linearizable read, that the election key is still
// the one this term created, and that it leads (the first-created key).
func (t *term) Confirm(ctx context.Context) error {
	select {
	case <-t.done:
		return broker.ErrNotLeader
	default:
	}
	rctx, cancel := t.l.s.request(ctx)
	defer cancel()
	resp, err := t.l.s.cli.Get(rctx, t.l.s.keys.election()+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return fmt.Errorf("etcd confirm leadership: %w", err)
	}
	if len(resp.Kvs) == 0 || string(resp.Kvs[0].Key) != t.fence.Key || resp.Kvs[0].CreateRevision != t.fence.Revision {
		t.end()
		return fmt.Errorf("%w: the election key %s is gone or no longer first", broker.ErrNotLeader, t.fence.Key)
	}
	return nil
}

// Resign deletes the election key (if this term still holds it), so
// another brokerd is elected at once.
func (t *term) Resign(ctx context.Context) error {
	defer t.end()
	rctx, cancel := t.l.s.request(ctx)
	defer cancel()
	return t.e.Resign(rctx)
}

// Status reads the group's members and its leader at one revision.
func (l *Leadership) Status(ctx context.Context) (GroupStatus, error) {
	return l.s.GroupStatus(ctx)
}

// GroupStatus reads the group's registered members and its leader at one
// revision.
func (s *Store) GroupStatus(ctx context.Context) (GroupStatus, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return GroupStatus{}, err
	}
	defer release()
	resp, err := s.readTxn(ctx, []clientv3.Op{
		clientv3.OpGet(s.keys.section(sectionInstance), clientv3.WithPrefix()),
		clientv3.OpGet(s.keys.election()+"/", clientv3.WithFirstCreate()...),
	})
	if err != nil {
		return GroupStatus{}, errRead("GroupStatus", err)
	}
	var st GroupStatus
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		var m Member
		if err := json.Unmarshal(kv.Value, &m); err != nil {
			return GroupStatus{}, fmt.Errorf("etcd GroupStatus: %w: %s", errCorrupt, kv.Key)
		}
		m.Run = ""
		st.Members = append(st.Members, m)
	}
	sort.Slice(st.Members, func(i, j int) bool { return st.Members[i].Name < st.Members[j].Name })
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
		var v leaderValue
		if err := json.Unmarshal(kvs[0].Value, &v); err != nil {
			return GroupStatus{}, fmt.Errorf("etcd GroupStatus: %w: %s", errCorrupt, kvs[0].Key)
		}
		st.Leader, st.LeaderSince = v.Instance, v.Since
	}
	return st, nil
}

// ErrNoLeader is GroupStatus's caller's error when the group has no
// leader (readiness).
var ErrNoLeader = errors.New("the broker group has no leader")
