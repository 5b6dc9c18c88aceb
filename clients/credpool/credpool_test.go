package credpool_test

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/credbroker/credbroker/clients/credbroker"
	"github.com/credbroker/credbroker/clients/credpool"
	"github.com/credbroker/credbroker/internal/brokertest"
	"github.com/credbroker/credbroker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestPoolSurvivesThreeReplacementsWithoutAFailedQuery: workers query the
// pool without pause while the credential is replaced three times (a role
// with a max TTL of a few seconds) and each old user is revoked, which
// drops it and ends its sessions. Not one query may fail, and the
// queries must have run as each of the four users.
func TestPoolSurvivesThreeReplacementsWithoutAFailedQuery(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := brokertest.Start(t, brokertest.Options{Roles: []brokertest.Role{{Name: "short", DefaultTTL: 6 * time.Second, MaxTTL: 6 * time.Second}}})
	c, err := credbroker.Dial(b.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pool, err := credpool.New(ctx, c, credpool.Options{
		Keeper: credbroker.KeeperOptions{
			Issue:         credbroker.IssueRequest{Role: "short"},
			Overlap:       2 * time.Second,
			ReplaceBefore: 3 * time.Second,
		},
		Configure:     func(cfg *pgxpool.Config) { cfg.MaxConns = 4 },
		RevokeOnClose: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()

	var (
		queries, failures atomic.Int64
		mu                sync.Mutex
		users             = map[string]int{}
		firstErr          error
		stop              = make(chan struct{})
		wg                sync.WaitGroup
	)
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				var user string
				err := pool.QueryRow(ctx, "SELECT session_user::text FROM pg_sleep(0.005)").Scan(&user)
				queries.Add(1)
				mu.Lock()
				if err != nil {
					failures.Add(1)
					if firstErr == nil {
						firstErr = err
					}
				} else {
					users[user]++
				}
				mu.Unlock()
			}
		})
	}

	// Three replacements, each old credential retired and its user dropped
	// while the workers keep querying.
	first, _, _ := pool.Keeper().Current()
	retired := []string{}
	deadline := time.After(90 * time.Second)
	for len(retired) < 3 {
		select {
		case ev := <-pool.Keeper().Events():
			if ev.Type == credbroker.EventRetired {
				retired = append(retired, ev.Lease.Username)
			}
		case <-deadline:
			close(stop)
			wg.Wait()
			t.Fatalf("only %d replacements retired within the deadline", len(retired))
		}
	}
	if retired[0] != first.Username {
		t.Errorf("first retired user %s, want %s", retired[0], first.Username)
	}
	for _, u := range retired {
		for {
			ok, err := b.RoleExists(ctx, u)
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				break
			}
			select {
			case <-pool.Keeper().Events():
			case <-time.After(20 * time.Millisecond):
			case <-ctx.Done():
				t.Fatalf("retired user %s was never dropped", u)
			}
		}
	}
	close(stop)
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d queries, %d failed, by user: %v", queries.Load(), failures.Load(), users)
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d of %d queries failed; first: %v", n, queries.Load(), firstErr)
	}
	if queries.Load() < 100 {
		t.Fatalf("only %d queries ran: the workload proves nothing", queries.Load())
	}
	for _, u := range append(retired, first.Username) {
		if users[u] == 0 {
			t.Errorf("no query ran as %s", u)
		}
	}
	if len(users) < 4 {
		t.Errorf("queries ran as %d users, want at least 4 (three replacements)", len(users))
	}
}
