package store

import (
	"fmt"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// The create benchmarks keep fsync on: what group commit buys is fewer
// fsyncs, and without them there is nothing to show.

func openBenchStore(b *testing.B, opts Options) *Store {
	b.Helper()
	s, err := Open(filepath.Join(b.TempDir(), "leases.db"), opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

func BenchmarkCreateLease(b *testing.B) {
	s := openBenchStore(b, Options{})
	ctx := b.Context()
	i := 0
	for b.Loop() {
		l := newLease(fmt.Sprintf("lease-%09d", i), "read_only", "billing", at(time.Duration(i)*time.Millisecond))
		i++
		if err := s.CreateLease(ctx, &l); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkCreateLeaseParallel(b *testing.B) {
	s := openBenchStore(b, Options{})
	ctx := b.Context()
	var n atomic.Int64
	// Many more writers than cores, as a busy broker has requests in
	// flight: they wait on fsync, not CPU, and Batch lets them share it.
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := n.Add(1)
			l := newLease(fmt.Sprintf("lease-%09d", i), "read_only", "billing", at(time.Duration(i)*time.Millisecond))
			if err := s.CreateLease(ctx, &l); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkGetLease(b *testing.B) {
	const leases = 10_000
	s := openBenchStore(b, Options{NoSync: true})
	fill(b, s, leases)
	ctx := b.Context()
	i := 0
	for b.Loop() {
		if _, err := s.GetLease(ctx, benchID(i%leases)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func BenchmarkScanExpiry(b *testing.B) {
	const leases = 100_000
	s := openBenchStore(b, Options{NoSync: true})
	fill(b, s, leases)
	ctx := b.Context()
	for b.Loop() {
		n := 0
		if err := s.ScanExpiry(ctx, func(broker.ExpiryEntry) bool { n++; return true }); err != nil {
			b.Fatal(err)
		}
		if n != leases {
			b.Fatalf("scanned %d entries, want %d", n, leases)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/leases, "ns/entry")
}

func benchID(i int) string { return fmt.Sprintf("lease-%09d", i) }

// fill stores n active leases in one transaction, through the same encoding
// and index code as CreateLease; n separate creates would dominate the run.
func fill(b *testing.B, s *Store, n int) {
	b.Helper()
	err := s.db.Update(func(tx *bolt.Tx) error {
		for i := range n {
			// Expire times out of id order, so the index order is not
			// the insertion order.
			l := newLease(benchID(i), "read_only", "billing", at(time.Duration((i*7919)%n)*time.Second))
			l.Revision = 1
			val, head, err := encodeLease(&l)
			if err != nil {
				return err
			}
			idx, _ := head.index(l.ID)
			if err := tx.Bucket(bucketLeases).Put(leaseKey(l.ID), val); err != nil {
				return err
			}
			if err := tx.Bucket(idx.bucket).Put(idx.key, idx.val); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

// BenchmarkUpdateLeasesBatch renews 64 leases per call, as the broker's
// renewal batcher does: one transaction, one fsync for the whole batch.
func BenchmarkUpdateLeasesBatch(b *testing.B) {
	const leases, batch = 4096, 64
	s := openBenchStore(b, Options{})
	fill(b, s, leases)
	ctx := b.Context()
	cur := make([]broker.Lease, leases)
	for i := range cur {
		l, err := s.GetLease(ctx, benchID(i))
		if err != nil {
			b.Fatal(err)
		}
		cur[i] = l
	}
	i := 0
	for b.Loop() {
		start := (i * batch) % leases
		ls := slices.Clone(cur[start : start+batch])
		for j := range ls {
			ls[j].ExpireTime = ls[j].ExpireTime.Add(time.Minute)
		}
		out, errs := s.UpdateLeases(ctx, ls)
		for j, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
			cur[start+j] = out[j]
		}
		i++
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/batch, "ns/lease")
}
