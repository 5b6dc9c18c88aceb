package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// issued is a lease the broker issued, with what the expiry scenario needs.
type issued struct {
	id, username string
	expire       time.Time
}

// runExpiry measures an expiry burst: N leases issued so that they all
// expire at the same instant, and the time until the expiry manager has
// dropped every user, watched from outside (pg_roles polled every
// --poll). Baseline: N DROP ROLEs at the broker's revoke concurrency.
func (e *env) runExpiry(ctx context.Context, rep *report, issueRate float64) error {
	n := e.opts.expiryN

	// Baseline first: create N users (untimed), then drop them all at
	// once at the broker's revoke concurrency.
	names, err := e.baselineUsers(ctx, "bench_x_", n)
	if err != nil {
		return fmt.Errorf("expiry setup: %w", err)
	}
	var (
		mu      sync.Mutex
		baseLag []time.Duration
	)
	start := time.Now()
	rb := eachOnce(ctx, e.revokeConcurrency(), names, func(ctx context.Context, u string) error {
		_, err := e.base.Exec(ctx, dropSQL(u))
		mu.Lock()
		baseLag = append(baseLag, time.Since(start))
		mu.Unlock()
		return err
	})
	errNote(rep, "expiry baseline", rb)
	baseTotal := rb.elapsed

	// Broker: issue N leases whose TTLs all end at one deadline, far
	// enough ahead for the issuing to finish.
	if issueRate <= 0 {
		issueRate = 100
	}
	lead := time.Duration(float64(n)/issueRate*1.5*float64(time.Second)) + 3*time.Second
	deadline := time.Now().Add(lead).Truncate(time.Second)
	var (
		imu  sync.Mutex
		iss  []issued
		late bool
	)
	ri := eachOnce(ctx, 16, make([]struct{}, n), func(ctx context.Context, _ struct{}) error {
		ttl := time.Until(deadline)
		if ttl < 200*time.Millisecond {
			imu.Lock()
			late = true
			imu.Unlock()
			return errors.New("issuing fell behind the deadline")
		}
		resp, err := e.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: e.role, Ttl: durationpb.New(ttl)})
		if err != nil {
			return err
		}
		l := resp.GetLease()
		imu.Lock()
		iss = append(iss, issued{id: l.GetId(), username: l.GetUsername(), expire: l.GetExpireTime().AsTime()})
		imu.Unlock()
		return nil
	})
	if late {
		rep.note("expiry: issuing was slower than estimated; %d of %d leases made it before the deadline", len(iss), n)
	} else {
		errNote(rep, "expiry issue", ri)
	}
	if len(iss) == 0 {
		return errors.New("expiry: no lease issued")
	}
	exp := make(map[string]time.Time, len(iss))
	first, last := iss[0].expire, iss[0].expire
	for _, l := range iss {
		exp[l.username] = l.expire
		first, last = minTime(first, l.expire), maxTime(last, l.expire)
	}
	rep.note("expiry: %d leases expire between %s and %s (spread %s)", len(iss), first.Format("15:04:05.000"), last.Format("15:04:05.000"), fmtDur(last.Sub(first)))

	timeout := time.Duration(float64(len(iss))/e.revokeRate()*float64(time.Second)) + 2*time.Minute
	var gone map[string]time.Time
	var werr error
	watch := func() { gone, werr = e.watchGone(ctx, exp, first.Add(timeout)) }
	time.Sleep(time.Until(first.Add(-100 * time.Millisecond)))
	if e.opts.profileDir != "" && e.broker != nil {
		if err := e.profile("expiry.pprof", watch); err != nil {
			rep.note("profile: %v", err)
		}
	} else {
		watch()
	}
	if werr != nil {
		return werr
	}
	type drop struct {
		at  time.Time
		lag time.Duration
	}
	drops := make([]drop, 0, len(gone))
	for u, at := range gone {
		drops = append(drops, drop{at, at.Sub(exp[u])})
	}
	slices.SortFunc(drops, func(a, b drop) int { return a.at.Compare(b.at) })
	lags := make([]time.Duration, len(drops))
	var excess time.Duration
	for i, d := range drops {
		lags[i] = d.lag
		// The rate limiter lets the i-th revocation start no earlier than
		// i/rate after the burst (less the burst allowance).
		allowed := time.Duration(float64(i+1) / e.revokeRate() * float64(time.Second))
		excess = max(excess, d.lag-allowed)
	}
	var total time.Duration
	if len(drops) > 0 {
		total = drops[len(drops)-1].at.Sub(first)
	}
	if len(gone) < len(iss) {
		rep.note("expiry: %d of %d users were still there after %s", len(iss)-len(gone), len(iss), fmtDur(timeout))
	}
	sc := fmt.Sprintf("expiry burst N=%d", len(iss))
	rep.add(row{scenario: sc, figure: "time until all dropped", broker: fmtDur(total), baseline: fmtDur(baseTotal),
		ratio: ratio(float64(total), float64(baseTotal)), target: "≤ 1.20", met: verdict(len(gone) == len(iss) && float64(total) <= 1.2*float64(baseTotal))})
	rep.add(row{scenario: sc, figure: "lag p50 / p99 / max", broker: fmtDur(percentile(lags, 50)) + " / " + fmtDur(percentile(lags, 99)) + " / " + fmtDur(percentile(lags, 100)),
		baseline: fmtDur(percentile(baseLag, 50)) + " / " + fmtDur(percentile(baseLag, 99)) + " / " + fmtDur(percentile(baseLag, 100)),
		ratio:    ratio(float64(percentile(lags, 100)), float64(percentile(baseLag, 100)))})
	rep.add(row{scenario: sc, figure: fmt.Sprintf("lag beyond rate limit (%.0f/s, %d workers)", e.revokeRate(), e.revokeConcurrency()),
		broker: fmtDur(excess), baseline: "—", ratio: "—", target: "≤ 2s", met: verdict(excess <= 2*time.Second)})
	return nil
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// watchGone polls pg_roles until none of the users is left (or until
// giveUp) and returns when each was first seen gone. A poll's time is when
// its query was sent, so a drop is placed at most one poll late.
func (e *env) watchGone(ctx context.Context, users map[string]time.Time, giveUp time.Time) (map[string]time.Time, error) {
	left := make(map[string]bool, len(users))
	for u := range users {
		left[u] = true
	}
	gone := make(map[string]time.Time, len(users))
	for len(left) > 0 && time.Now().Before(giveUp) {
		names := make([]string, 0, len(left))
		for u := range left {
			names = append(names, u)
		}
		at := time.Now()
		rows, err := e.watch.Query(ctx, "SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", names)
		if err != nil {
			return nil, err
		}
		still := make(map[string]bool, len(names))
		for rows.Next() {
			var u string
			if err := rows.Scan(&u); err != nil {
				rows.Close()
				return nil, err
			}
			still[u] = true
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, err
		}
		for _, u := range names {
			if !still[u] {
				gone[u] = at
				delete(left, u)
			}
		}
		if len(left) > 0 {
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(e.opts.poll):
			}
		}
	}
	return gone, nil
}
