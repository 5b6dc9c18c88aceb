package main

import (
	"context"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// Untimed setup and teardown the scenarios share: issuing leases through
// the broker, creating and dropping the baseline's users, profiling.

// collector collects the names (baseline) or lease ids (broker) a phase made.
type collector struct {
	mu    sync.Mutex
	items []string
}

func (c *collector) add(s string) {
	c.mu.Lock()
	c.items = append(c.items, s)
	c.mu.Unlock()
}

func (c *collector) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.items
	c.items = nil
	return out
}

// issueMany issues n leases through the broker at 16 clients (setup,
// untimed) and returns their ids.
func (e *env) issueMany(ctx context.Context, n int) ([]string, error) {
	var ids collector
	r := eachOnce(ctx, min(16, n), make([]struct{}, n), func(ctx context.Context, _ struct{}) error {
		resp, err := e.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: e.role})
		if err != nil {
			return err
		}
		ids.add(resp.GetLease().GetId())
		return nil
	})
	if r.errs > 0 {
		e.cleanup(ctx, nil, ids.take(), nil)
		return nil, r.firstErr
	}
	return ids.take(), nil
}

// baselineUsers creates n users for the baseline (untimed), named prefix
// and random hex, as its issue phase does, valid for an hour.
func (e *env) baselineUsers(ctx context.Context, prefix string, n int) ([]string, error) {
	verifier := baselineVerifier(e.opts.scramIterations)
	names := make([]string, n)
	for i := range names {
		names[i] = prefix + randHex(6)
	}
	if err := e.bulk(ctx, names, func(u string) string { return e.issueSQL(u, verifier, time.Now().Add(time.Hour)) }); err != nil {
		return nil, err
	}
	return names, nil
}

// bulk runs one statement per item, many per round trip: setup and
// cleanup, never timed.
func (e *env) bulk(ctx context.Context, items []string, stmt func(string) string) error {
	for _, part := range chunks(items, (len(items)+199)/200) {
		var b strings.Builder
		for i, it := range part {
			if i > 0 {
				b.WriteString("; ")
			}
			b.WriteString(stmt(it))
		}
		if _, err := e.base.Exec(ctx, b.String()); err != nil {
			return err
		}
	}
	return nil
}

// cleanup revokes leases through the broker and drops baseline users
// directly, untimed, so the next scenario starts from the same catalog.
func (e *env) cleanup(ctx context.Context, rep *report, leases, users []string) {
	e.cleanupWith(ctx, rep, e.adminC, leases, users)
}

// cleanupWith is cleanup with the leases revoked through adminC (a broker
// process's, see childBroker).
func (e *env) cleanupWith(ctx context.Context, rep *report, adminC pb.AdminServiceClient, leases, users []string) {
	for _, part := range chunks(leases, (len(leases)+499)/500) {
		if _, err := adminC.RevokeLeases(ctx, &pb.RevokeLeasesRequest{LeaseIds: part}); err != nil {
			if rep != nil {
				rep.note("cleanup: revoking leases: %v", err)
			}
			break
		}
	}
	if err := e.bulk(ctx, users, dropSQL); err != nil && rep != nil {
		rep.note("cleanup: dropping baseline users: %v", err)
	}
}

// profile writes a CPU profile of this process (the in-process broker and
// the bench's own clients) while fn runs.
func (e *env) profile(name string, fn func()) error {
	if err := os.MkdirAll(e.opts.profileDir, 0o755); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(e.opts.profileDir, name))
	if err != nil {
		return err
	}
	defer f.Close()
	if err := pprof.StartCPUProfile(f); err != nil {
		return err
	}
	fn()
	pprof.StopCPUProfile()
	return nil
}
