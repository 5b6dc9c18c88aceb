package credbroker_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/clients/credbroker"
	"github.com/credbroker/credbroker/internal/brokertest"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// soakDuration is CREDBROKER_SOAK_DURATION (a Go duration), default 10s.
func soakDuration(t *testing.T) time.Duration {
	v := os.Getenv("CREDBROKER_SOAK_DURATION")
	if v == "" {
		return 10 * time.Second
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("CREDBROKER_SOAK_DURATION=%q: want a positive duration", v)
	}
	return d
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

type footprint struct {
	goroutines int
	heap       uint64
}

func measure() footprint {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return footprint{goroutines: runtime.NumGoroutine(), heap: ms.HeapAlloc}
}

func (f footprint) String() string {
	return fmt.Sprintf("goroutines=%d heap=%.1fMiB", f.goroutines, float64(f.heap)/(1<<20))
}

// TestSoakThousandKeepAliveStreams holds 1,000 KeepAlive streams open
// (CREDBROKER_SOAK_STREAMS) against an in-process broker, each renewing
// its lease about once a second, for CREDBROKER_SOAK_DURATION. Client and
// broker share the process, so runtime figures cover both. The goroutine
// count and the live heap (after a GC) must stay flat between the start of
// the soak and its end, and fall back once the streams close.
func TestSoakThousandKeepAliveStreams(t *testing.T) {
	duration := soakDuration(t)
	nStreams := envInt(t, "CREDBROKER_SOAK_STREAMS", 1000)
	nLeases := envInt(t, "CREDBROKER_SOAK_LEASES", 250)
	const nConns = 10
	ctx, cancel := context.WithTimeout(context.Background(), duration+3*time.Minute)
	defer cancel()

	b := brokertest.Start(t, brokertest.Options{})
	c := dial(t, b)
	leaseIDs := make([]string, nLeases)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	var issueErr atomic.Value
	for i := range leaseIDs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			l, _, err := c.Issue(ctx, credbroker.IssueRequest{Role: "read_only"})
			if err != nil {
				issueErr.Store(err)
				return
			}
			leaseIDs[i] = l.ID
		})
	}
	wg.Wait()
	if err, _ := issueErr.Load().(error); err != nil {
		t.Fatalf("issue: %v", err)
	}
	baseline := measure()

	conns := make([]*grpc.ClientConn, nConns)
	for i := range conns {
		conn, err := grpc.NewClient(b.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conns[i] = conn
	}

	var (
		answers, renewed, failed atomic.Int64
		answered                 = make([]atomic.Bool, nStreams)
		streamErr                atomic.Value
		stop                     = make(chan struct{})
		streams                  sync.WaitGroup
	)
	for i := range nStreams {
		streams.Go(func() {
			sctx, scancel := context.WithCancel(ctx)
			defer scancel()
			cred := pb.NewCredentialServiceClient(conns[i%nConns])
			stream, err := cred.KeepAlive(sctx)
			if err != nil {
				streamErr.Store(err)
				return
			}
			recvDone := make(chan struct{})
			go func() {
				defer close(recvDone)
				for {
					resp, err := stream.Recv()
					if err != nil {
						return
					}
					answers.Add(1)
					answered[i].Store(true)
					switch resp.GetEvent() {
					case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED:
						renewed.Add(1)
					default:
						failed.Add(1)
						streamErr.Store(fmt.Errorf("stream %d: %v %s", i, resp.GetEvent(), resp.GetMessage()))
					}
				}
			}()
			req := &pb.KeepAliveRequest{LeaseId: leaseIDs[i%nLeases], Increment: durationpb.New(10 * time.Minute)}
			tick := time.NewTicker(time.Second + time.Duration(rand.Int64N(int64(200*time.Millisecond))))
			defer tick.Stop()
			for {
				if err := stream.Send(req); err != nil {
					streamErr.Store(fmt.Errorf("stream %d send: %w", i, err))
					return
				}
				select {
				case <-tick.C:
				case <-stop:
					_ = stream.CloseSend()
					<-recvDone
					return
				}
			}
		})
	}

	// Warm up: every stream answered once, so every server-side stream,
	// subscription and forwarder exists.
	warm := time.Now().Add(2 * time.Minute)
	for i := range answered {
		for !answered[i].Load() {
			if time.Now().After(warm) {
				t.Fatalf("stream %d got no answer; error: %v", i, streamErr.Load())
			}
			time.Sleep(10 * time.Millisecond) // polling counters the streams update
		}
	}
	start := measure()
	startAnswers := answers.Load()
	t0 := time.Now()
	time.Sleep(duration / 2) // the soak itself: load runs for a fixed time
	middle := measure()
	time.Sleep(duration - duration/2)
	end := measure()
	elapsed := time.Since(t0)
	soakAnswers := answers.Load() - startAnswers
	close(stop)
	streams.Wait()
	for _, conn := range conns {
		_ = conn.Close()
	}

	// Once the streams are gone, the broker's per-stream goroutines go too.
	var after footprint
	deadline := time.Now().Add(30 * time.Second)
	for {
		after = measure()
		if after.goroutines <= baseline.goroutines+20 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}

	t.Logf("soak: %d streams on %d connections over %d leases for %v", nStreams, nConns, nLeases, elapsed.Round(time.Millisecond))
	t.Logf("soak: answers during the soak %d (%.0f/s), renewed total %d, failed %d", soakAnswers, float64(soakAnswers)/elapsed.Seconds(), renewed.Load(), failed.Load())
	t.Logf("soak: before streams %v; start %v; middle %v; end %v; after close %v", baseline, start, middle, end, after)

	if err, _ := streamErr.Load().(error); err != nil {
		t.Errorf("a stream failed: %v", err)
	}
	if failed.Load() != 0 {
		t.Errorf("%d answers were not RENEWED", failed.Load())
	}
	if soakAnswers < int64(nStreams) {
		t.Errorf("only %d answers during the soak for %d streams", soakAnswers, nStreams)
	}
	flatG := func(f footprint) bool { return float64(f.goroutines) <= float64(start.goroutines)*1.2+50 }
	flatH := func(f footprint) bool { return float64(f.heap) <= float64(start.heap)*1.2+16<<20 }
	for name, f := range map[string]footprint{"middle": middle, "end": end} {
		if !flatG(f) {
			t.Errorf("goroutines grew: start %d, %s %d", start.goroutines, name, f.goroutines)
		}
		if !flatH(f) {
			t.Errorf("heap grew: start %v, %s %v", start, name, f)
		}
	}
	if after.goroutines > baseline.goroutines+20 {
		t.Errorf("goroutines after the streams closed: %d, before they opened: %d", after.goroutines, baseline.goroutines)
	}
}
