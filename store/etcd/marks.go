package etcd

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/credbroker/credbroker/broker"
)

// Stream marks (broker.StreamMarker). A mark is an empty key
// P stream/<instance>/<lease id> attached to one etcd lease of this
// process, its session: kept alive while the process lives, so a crash
// removes every mark of the process within the session's TTL, and the
// leader (which sees the deletions on the change feed) starts the
// disconnect grace of those leases. If the session expires while the
// process lives (cut off from etcd for longer than the TTL), the process
// grants a new one and puts its marks again; the leader may meanwhile
// have started their grace, which the new marks end.
//
// A put or delete that fails is retried by the session loop until it
// succeeds or the mark changes again, so a stream that closed is never
// left marked open.

var _ broker.StreamMarker = (*Store)(nil)

// markSession is the session lease and the marks of one Store.
type markSession struct {
	ttl time.Duration

	mu      sync.Mutex
	marks   map[string]bool // key -> wanted (true: put, false: delete) while not settled
	pending map[string]bool // keys whose last write failed, for the loop
	lease   clientv3.LeaseID
	lost    chan struct{} // closed when lease's keep-alive ends
	running bool
	wake    chan struct{}
	cancel  context.CancelFunc
	done    chan struct{}

	grantMu sync.Mutex // one grant at a time
}

func (m *markSession) init(ttl time.Duration) {
	if ttl <= 0 {
		ttl = DefaultMarkTTL
	}
	m.ttl = ttl
	m.marks = make(map[string]bool)
	m.pending = make(map[string]bool)
	m.wake = make(chan struct{}, 1)
}

// MarkStream records that a KeepAlive stream on instance names leaseID.
func (s *Store) MarkStream(ctx context.Context, instance, leaseID string) error {
	return s.setMark(ctx, instance, leaseID, true)
}

// UnmarkStream removes the mark MarkStream wrote.
func (s *Store) UnmarkStream(ctx context.Context, instance, leaseID string) error {
	return s.setMark(ctx, instance, leaseID, false)
}

func (s *Store) setMark(ctx context.Context, instance, leaseID string, open bool) error {
	if err := CheckInstance(instance); err != nil {
		return err
	}
	if err := broker.CheckLeaseID(leaseID); err != nil {
		return err
	}
	release, err := s.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	key := s.keys.stream(instance, leaseID)
	m := &s.marks
	m.mu.Lock()
	if open {
		m.marks[key] = true
	} else {
		delete(m.marks, key)
	}
	m.startLocked(s)
	m.mu.Unlock()
	if err := s.writeMark(ctx, key, open); err != nil {
		m.mu.Lock()
		m.pending[key] = open
		m.mu.Unlock()
		m.signal()
		return errRead("MarkStream", err)
	}
	return nil
}

// writeMark puts (open) or deletes one mark, granting the session first if
// there is none.
func (s *Store) writeMark(ctx context.Context, key string, open bool) error {
	if !open {
		rctx, cancel := s.request(ctx)
		defer cancel()
		_, err := s.cli.Delete(rctx, key)
		return err
	}
	for attempt := 0; ; attempt++ {
		lease, err := s.markLease(ctx)
		if err != nil {
			return err
		}
		rctx, cancel := s.request(ctx)
		_, err = s.cli.Put(rctx, key, "", clientv3.WithLease(lease))
		cancel()
		if errors.Is(err, rpctypes.ErrLeaseNotFound) && attempt == 0 {
			s.marks.dropLease(lease) // expired meanwhile: grant another
			continue
		}
		return err
	}
}

// markLease returns the session lease of the marks, granting it and starting its
// keep-alive if there is none.
func (s *Store) markLease(ctx context.Context) (clientv3.LeaseID, error) {
	m := &s.marks
	m.grantMu.Lock()
	defer m.grantMu.Unlock()
	m.mu.Lock()
	lease := m.lease
	m.mu.Unlock()
	if lease != 0 {
		return lease, nil
	}
	rctx, cancel := s.request(ctx)
	defer cancel()
	ttl := int64((m.ttl + time.Second - 1) / time.Second)
	g, err := s.cli.Grant(rctx, ttl)
	if err != nil {
		return 0, err
	}
	ka, err := s.cli.KeepAlive(s.doneCtx, g.ID)
	if err != nil {
		return 0, err
	}
	lost := make(chan struct{})
	go func() {
		// The client renews while someone reads; the channel closes
		// when the lease is gone or cannot be renewed.
		for range ka {
		}
		close(lost)
	}()
	m.mu.Lock()
	m.lease, m.lost = g.ID, lost
	m.mu.Unlock()
	m.signal()
	return g.ID, nil
}

// dropLease forgets lease if it is still the session's.
func (m *markSession) dropLease(lease clientv3.LeaseID) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lease == lease {
		m.lease, m.lost = 0, nil
	}
}

func (m *markSession) signal() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// startLocked starts the session loop once; m.mu is held.
func (m *markSession) startLocked(s *Store) {
	if m.running {
		return
	}
	m.running = true
	ctx, cancel := context.WithCancel(s.doneCtx)
	m.cancel = cancel
	m.done = make(chan struct{})
	go func() {
		defer close(m.done)
		s.markLoop(ctx)
	}()
}

// markLoop re-puts every mark when the session is lost, and retries
// writes that failed, with a backoff.
func (s *Store) markLoop(ctx context.Context) {
	m := &s.marks
	failures := 0
	for {
		m.mu.Lock()
		lost, lease := m.lost, m.lease
		pending := len(m.pending) > 0 || (lease == 0 && len(m.marks) > 0)
		m.mu.Unlock()
		var retry <-chan time.Time
		if pending {
			failures++
			bound := min(feedRetryMin<<min(failures, 10), feedRetryMax)
			retry = time.After(bound)
		} else {
			failures = 0
		}
		select {
		case <-ctx.Done():
			return
		case <-lost:
			s.log.Warn("etcd store: the session of this instance's stream marks ended; putting them again under a new one")
			m.dropLease(lease)
			m.mu.Lock()
			for key := range m.marks {
				m.pending[key] = true
			}
			m.mu.Unlock()
			continue
		case <-m.wake:
		case <-retry:
		}
		s.flushMarks(ctx)
	}
}

// flushMarks writes what is pending; what fails stays pending.
func (s *Store) flushMarks(ctx context.Context) {
	m := &s.marks
	m.mu.Lock()
	if m.lease == 0 && len(m.marks) > 0 {
		for key := range m.marks {
			m.pending[key] = true
		}
	}
	todo := make(map[string]bool, len(m.pending))
	for k, v := range m.pending {
		todo[k] = v
	}
	m.mu.Unlock()
	for key := range todo {
		m.mu.Lock()
		open := m.marks[key] // the wish now, not when it failed
		m.mu.Unlock()
		err := s.writeMark(ctx, key, open)
		m.mu.Lock()
		if err == nil && m.marks[key] == open {
			delete(m.pending, key)
		}
		m.mu.Unlock()
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("etcd store: writing a stream mark failed; retrying", "err", err)
			}
			return
		}
	}
}

// stop ends the session loop and revokes the session, so this process's
// marks go at once rather than after the TTL (a graceful stop: its streams
// have ended).
func (m *markSession) stop(s *Store) {
	m.mu.Lock()
	cancel, done, lease := m.cancel, m.done, m.lease
	m.lease, m.lost = 0, nil
	m.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
	if lease != 0 {
		ctx, cc := context.WithTimeout(context.Background(), time.Second)
		_, _ = s.cli.Revoke(ctx, lease)
		cc()
	}
}
