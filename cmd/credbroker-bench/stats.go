package main

import (
	"context"
	"slices"
	"sync"
	"time"
)

// result is what one timed phase measured: how many operations finished,
// how many failed, how long the phase took and every successful
// operation's latency.
type result struct {
	ops      int
	errs     int
	elapsed  time.Duration
	lat      []time.Duration
	firstErr error
}

// merge adds r2's counts and latencies to r; elapsed times add up, so the
// throughput of merged phases is ops over the time they ran.
func (r *result) merge(r2 result) {
	r.ops += r2.ops
	r.errs += r2.errs
	r.elapsed += r2.elapsed
	r.lat = append(r.lat, r2.lat...)
	if r.firstErr == nil {
		r.firstErr = r2.firstErr
	}
}

func (r result) perSec() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.ops) / r.elapsed.Seconds()
}

// pct returns the p-th percentile (0..100) of the latencies, nearest rank.
func (r result) pct(p float64) time.Duration {
	return percentile(r.lat, p)
}

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	i = max(0, min(i, len(s)-1))
	return s[i]
}

// closedLoop runs op from c workers, each starting its next operation as
// soon as the previous one returns, until d has passed. Worker w's n-th
// call gets (w, n).
func closedLoop(ctx context.Context, c int, d time.Duration, op func(ctx context.Context, w, n int) error) result {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	deadline := time.Now().Add(d)
	var (
		mu  sync.Mutex
		res result
		wg  sync.WaitGroup
	)
	start := time.Now()
	for w := range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var local result
			for n := 0; time.Now().Before(deadline) && ctx.Err() == nil; n++ {
				t := time.Now()
				err := op(ctx, w, n)
				if err != nil {
					local.errs++
					if local.firstErr == nil {
						local.firstErr = err
					}
					continue
				}
				local.ops++
				local.lat = append(local.lat, time.Since(t))
			}
			mu.Lock()
			res.merge(local)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// eachOnce runs op once for every item, from c workers, and times the
// whole: the phase ends when the last item is done.
func eachOnce[T any](ctx context.Context, c int, items []T, op func(ctx context.Context, item T) error) result {
	var (
		mu   sync.Mutex
		res  result
		wg   sync.WaitGroup
		next = make(chan T)
	)
	start := time.Now()
	for range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var local result
			for it := range next {
				t := time.Now()
				if err := op(ctx, it); err != nil {
					local.errs++
					if local.firstErr == nil {
						local.firstErr = err
					}
					continue
				}
				local.ops++
				local.lat = append(local.lat, time.Since(t))
			}
			mu.Lock()
			res.merge(local)
			mu.Unlock()
		}()
	}
	for _, it := range items {
		next <- it
	}
	close(next)
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// chunks splits items into n nearly equal parts (fewer when items is short).
func chunks[T any](items []T, n int) [][]T {
	if n < 1 {
		n = 1
	}
	var out [][]T
	size := (len(items) + n - 1) / n
	for size > 0 && len(items) > 0 {
		k := min(size, len(items))
		out = append(out, items[:k])
		items = items[k:]
	}
	return out
}
