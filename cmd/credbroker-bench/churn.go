package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/store"
)

// runChurn simulates --churn-hours of steady issue and expiry on a store,
// through the same store calls the broker makes (intent, lease, two
// updates on expiry, tombstone purge every reconcile interval), on a
// simulated clock. The first --retention of it fills the tombstones to
// steady state; after that the file is sampled every simulated hour, and
// the largest size is compared with a compacted copy at the end: what the
// live leases plus retained tombstones need.
func (e *env) runChurn(ctx context.Context, rep *report) error {
	dir := filepath.Join(e.tmp, "churn")
	path := filepath.Join(dir, "leases.db")
	// fsync changes nothing about the file's size, only the run's length.
	s, err := store.Open(path, store.Options{NoSync: true})
	if err != nil {
		return err
	}
	defer s.Close()
	var (
		retention  = e.opts.retention
		perMinute  = e.opts.churnRate / 60
		ttl        = e.opts.churnTTL
		purgeEvery = 5 * time.Minute
		clock      = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		end        = clock.Add(retention + e.opts.churnHours)
		steady     = clock.Add(retention)
		live       []broker.Lease // in expiry order: one TTL for all
		nextPurge  = clock.Add(purgeEvery)
		nextProbe  = steady
		maxSize    int64
		issuedN    int
		carry      float64
	)
	for clock.Before(end) {
		carry += perMinute
		for ; carry >= 1; carry-- {
			id := fmt.Sprintf("churn-%012d", issuedN)
			issuedN++
			at := clock.Add(time.Duration(issuedN%60) * time.Second)
			in := broker.Intent{LeaseID: id, Target: "main", Username: "cb_churn_" + randHex(8), ProxyRole: "ro", CreateTime: at}
			if err := s.PutIntent(ctx, in); err != nil {
				return err
			}
			l := broker.Lease{ID: id, Role: "churn", Client: "svc", Target: "main", Username: in.Username, ProxyRole: "ro",
				IssueTime: at, ExpireTime: at.Add(ttl), MaxExpireTime: at.Add(ttl), State: broker.StateActive}
			if err := s.CreateLease(ctx, &l); err != nil {
				return err
			}
			live = append(live, l)
		}
		clock = clock.Add(time.Minute)
		for len(live) > 0 && !live[0].ExpireTime.After(clock) {
			l := live[0]
			live = live[1:]
			l.State = broker.StateRevoking
			l, err = s.UpdateLease(ctx, l)
			if err != nil {
				return err
			}
			l.State, l.EndTime = broker.StateExpired, l.ExpireTime.Add(time.Second)
			if _, err := s.UpdateLease(ctx, l); err != nil {
				return err
			}
		}
		if !clock.Before(nextPurge) {
			nextPurge = clock.Add(purgeEvery)
			for {
				n, err := s.PurgeTombstones(ctx, clock.Add(-retention), 1000)
				if err != nil {
					return err
				}
				if n < 1000 {
					break
				}
			}
		}
		if !clock.Before(nextProbe) {
			nextProbe = clock.Add(time.Hour)
			size, err := s.Size()
			if err != nil {
				return err
			}
			maxSize = max(maxSize, size)
		}
	}
	needed, err := s.CompactCopy(filepath.Join(dir, "compacted.db"))
	if err != nil {
		return err
	}
	final, _ := s.Size()
	_ = os.Remove(filepath.Join(dir, "compacted.db"))
	rep.note("churn: %d leases issued over %s simulated (%.0f/h, TTL %s, tombstone retention %s); %d live and about %.0f tombstones at the end",
		issuedN, retention+e.opts.churnHours, e.opts.churnRate, ttl, retention, len(live), e.opts.churnRate*retention.Hours())
	rep.add(row{scenario: fmt.Sprintf("bbolt file, %s churn at steady state", e.opts.churnHours), figure: "largest file / compacted (live + tombstones)",
		broker: fmt.Sprintf("%.1f MB (end %.1f MB)", mb(maxSize), mb(final)), baseline: fmt.Sprintf("%.1f MB", mb(needed)),
		ratio: ratio(float64(maxSize), float64(needed)), target: "≤ 2.00", met: verdict(float64(maxSize) <= 2*float64(needed))})
	return nil
}

func mb(n int64) float64 { return float64(n) / (1 << 20) }
