package main

import (
	"context"
	crand "crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store"
)

// runStreams measures the broker holding --streams KeepAlive streams open,
// one lease each, every stream renewing at 2/3 of --streams-ttl (as the Go
// client's keeper does), with random phases so the renewals spread evenly:
// the broker process's resident memory per stream and its CPU at steady
// state. Issuing is not what is measured, so the leases are set up the
// fast way, untimed: the users created in bulk (200 statements per round
// trip, one shared verifier) in a marker role of their own, the leases
// written into a fresh store file (package store's ImportLeases), and a
// broker process started on that file. It then opens the streams and,
// after one renewal period's warm-up at most, measures --streams-window in
// --rounds equal parts: CPU seconds per second (from /proc/PID/stat),
// renewals answered, and VmRSS at the end of each part, against VmRSS
// with the leases loaded and no stream open.
func (e *env) runStreams(ctx context.Context, rep *report) error {
	if e.broker == nil {
		rep.note("streams: skipped with --broker (it needs a broker process of its own)")
		return nil
	}
	n, ttl := e.opts.streams, e.opts.streamsTTL
	period := ttl * 2 / 3
	dir := filepath.Join(e.tmp, "streams")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	marker := e.markerRole + "_streams"

	t := time.Now()
	users, err := e.streamUsers(ctx, marker, n)
	defer func() {
		if err := e.bulkParallel(context.WithoutCancel(ctx), users, dropSQL); err != nil {
			rep.note("streams: dropping the users: %v", err)
		}
	}()
	if err != nil {
		return fmt.Errorf("streams setup: %w", err)
	}
	storePath := filepath.Join(dir, "leases.db")
	ids, err := writeStreamLeases(ctx, storePath, users, e.role, e.proxyRole)
	if err != nil {
		return fmt.Errorf("streams setup: %w", err)
	}
	b, err := e.startChild(ctx, "streams-broker", marker, storePath)
	if err != nil {
		return fmt.Errorf("streams setup: %w", err)
	}
	defer e.stopChild(ctx, b)
	rep.note("streams: %d users, leases and a broker process set up in %s (untimed)", n, fmtDur(time.Since(t)))

	rssIdle, _, err := procMemory(b.pid())
	if err != nil {
		return err
	}
	addr := b.conn.Target()
	conns := e.opts.streamsConns
	if conns == 0 || conns > n {
		conns = n
	}
	var (
		renewed    atomic.Int64
		failed     atomic.Int64
		openFailed atomic.Int64
		errOnce    sync.Once
		first      error
	)
	fail := func(err error) {
		failed.Add(1)
		errOnce.Do(func() { first = err })
	}
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	cc := make([]*grpc.ClientConn, conns)
	defer func() {
		for _, c := range cc {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	t = time.Now()
	for i := range cc {
		if cc[i], err = grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
			return err
		}
	}
	opened := make(chan struct{}, n)
	for i, id := range ids {
		client := pb.NewCredentialServiceClient(cc[i%conns])
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Thousands of connections opened at once meet transient
			// failures (a full accept queue): wait for the connection to
			// be ready, and try again a few times.
			var s pb.CredentialService_KeepAliveClient
			var err error
			for try := 0; try < 3; try++ {
				if s, err = client.KeepAlive(sctx, grpc.WaitForReady(true)); err == nil || sctx.Err() != nil {
					break
				}
			}
			opened <- struct{}{}
			if err != nil {
				openFailed.Add(1)
				fail(err)
				return
			}
			go func() { // the stream's one reader
				for {
					resp, err := s.Recv()
					if err != nil {
						if sctx.Err() == nil {
							fail(err)
						}
						return
					}
					switch resp.GetEvent() {
					case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED:
						renewed.Add(1)
					default:
						fail(fmt.Errorf("lease %s: event %s %s", resp.GetLease().GetId(), resp.GetEvent(), resp.GetMessage()))
					}
				}
			}()
			next := time.Now().Add(rand.N(period))
			for {
				select {
				case <-sctx.Done():
					_ = s.CloseSend()
					return
				case <-time.After(time.Until(next)):
				}
				if err := s.Send(&pb.KeepAliveRequest{LeaseId: id, Increment: durationpb.New(ttl)}); err != nil {
					if sctx.Err() == nil {
						fail(err)
					}
					return
				}
				next = next.Add(period)
			}
		}()
	}
	openBy := time.After(5 * time.Minute)
	for range n {
		select {
		case <-opened:
		case <-openBy:
			return fmt.Errorf("opening %d streams: not all open after 5 minutes", n)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	// A stream or two that could not be opened does not change what is
	// measured (per stream, per renewal); more would.
	if f := openFailed.Load(); f > int64(n/100) {
		return fmt.Errorf("opening %d streams: %d failed; first: %w", n, f, first)
	}
	rep.note("streams: %d of %d streams on %d connections opened in %s", int64(n)-openFailed.Load(), n, conns, fmtDur(time.Since(t)))
	n -= int(openFailed.Load())

	// Steady state: every stream has its first renewal scheduled within
	// one period of opening, at a uniformly random phase, so the rate is
	// steady from the start; a short settle lets the openings' own work end.
	settle := min(period/4, 5*time.Second)
	select {
	case <-time.After(settle):
	case <-ctx.Done():
		return ctx.Err()
	}
	part := e.opts.streamsWindow / time.Duration(e.opts.rounds)
	var cpuS, rateS, perRenewal, rssS series
	for range e.opts.rounds {
		c0, err := b.cpu()
		if err != nil {
			return err
		}
		r0, t0 := renewed.Load(), time.Now()
		select {
		case <-time.After(part):
		case <-ctx.Done():
			return ctx.Err()
		}
		c1, err := b.cpu()
		if err != nil {
			return err
		}
		r1, el := renewed.Load(), time.Since(t0)
		rss, _, err := procMemory(b.pid())
		if err != nil {
			return err
		}
		cpuS = append(cpuS, (c1-c0).Seconds()/el.Seconds())
		rateS = append(rateS, float64(r1-r0)/el.Seconds())
		if r1 > r0 {
			perRenewal = append(perRenewal, (c1-c0).Seconds()/float64(r1-r0))
		}
		rssS = append(rssS, float64(rss))
	}
	if f := failed.Load(); f > 0 {
		rep.note("streams: %d renewals or streams failed; first: %v", f, first)
	}
	sc := fmt.Sprintf("streams N=%d, TTL %s", n, ttl)
	expected := float64(n) / period.Seconds()
	perStream := make(series, len(rssS))
	for i, v := range rssS {
		perStream[i] = (v - float64(rssIdle)) * 1024 / float64(n)
	}
	rep.add(row{scenario: sc, figure: "broker RSS per stream (with streams − leases alone)",
		broker: perStream.format(fmtBytes), baseline: fmt.Sprintf("%d MB before, %s with", rssIdle>>10, rssS.format(fmtKBasMB))})
	rep.add(row{scenario: sc, figure: fmt.Sprintf("broker CPU at steady state (renewals/s; %.0f/s expected)", expected),
		broker: cpuS.format(fmtCores) + ", " + rateS.format(fmtRate), baseline: "—"})
	rep.add(row{scenario: sc, figure: "broker CPU per renewal", broker: perRenewal.format(fmtSecs), baseline: "—"})
	return nil
}

// streamUsers creates n users (untimed) in marker, a marker role of their
// own, created here, so that the streams broker finds them all leased.
func (e *env) streamUsers(ctx context.Context, marker string, n int) ([]string, error) {
	var exists bool
	if err := e.base.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", marker).Scan(&exists); err != nil {
		return nil, err
	}
	if !exists {
		if _, err := e.base.Exec(ctx, "CREATE ROLE "+postgres.QuoteIdentifier(marker)+" NOLOGIN"); err != nil {
			return nil, fmt.Errorf("creating marker role %s: %w", marker, err)
		}
		// PostgreSQL 16+ gives the creator ADMIN OPTION by itself.
		_, _ = e.base.Exec(ctx, "GRANT "+postgres.QuoteIdentifier(marker)+" TO "+postgres.QuoteIdentifier(e.admin)+" WITH ADMIN OPTION")
	}
	v := baselineVerifier(e.opts.scramIterations)
	until := time.Now().Add(24 * time.Hour)
	names := make([]string, n)
	for i := range names {
		names[i] = "bench_s_" + randHex(8)
	}
	err := e.bulkParallel(ctx, names, func(u string) string { return postgres.CreateUserSQL(u, e.proxyRole, marker, v, until) })
	return names, err
}

// bulkParallel is bulk from a few connections at once.
func (e *env) bulkParallel(ctx context.Context, items []string, stmt func(string) string) error {
	if len(items) == 0 {
		return nil
	}
	parts := chunks(items, (len(items)+199)/200)
	r := eachOnce(ctx, min(4, len(parts)), parts, func(ctx context.Context, part []string) error {
		return e.bulk(ctx, part, stmt)
	})
	if r.errs > 0 {
		return r.firstErr
	}
	return nil
}

// writeStreamLeases writes one active lease per user into a new store file,
// expiring in an hour (the streams' renewals then keep them alive), and
// returns their ids.
func writeStreamLeases(ctx context.Context, path string, users []string, role, proxy string) ([]string, error) {
	s, err := store.Open(path, store.Options{NoSync: true})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	now := time.Now()
	ls := make([]broker.Lease, len(users))
	ids := make([]string, len(users))
	for i, u := range users {
		ids[i] = leaseID()
		ls[i] = broker.Lease{
			ID: ids[i], Role: role, Client: "bench-streams", Target: "main", Username: u, ProxyRole: proxy,
			IssueTime: now, ExpireTime: now.Add(time.Hour), MaxExpireTime: now.Add(24 * time.Hour), State: broker.StateActive,
		}
	}
	if err := s.ImportLeases(ctx, ls); err != nil {
		return nil, err
	}
	if len(ids) == 0 {
		return nil, errors.New("no lease")
	}
	return ids, nil
}

// leaseID is a random id in the broker's format (32 characters of
// [a-z2-7]): the API refuses any other.
func leaseID() string {
	b := make([]byte, 20)
	_, _ = crand.Read(b)
	return strings.ToLower(base32.StdEncoding.EncodeToString(b))
}

func fmtBytes(v float64) string {
	switch {
	case v >= 1<<20:
		return fmt.Sprintf("%.1f MB", v/(1<<20))
	case v >= 1<<10:
		return fmt.Sprintf("%.1f KB", v/(1<<10))
	default:
		return fmt.Sprintf("%.0f B", v)
	}
}

func fmtKBasMB(kb float64) string { return fmt.Sprintf("%.0f MB", kb/1024) }

func fmtCores(v float64) string { return fmt.Sprintf("%.3f CPU", v) }
