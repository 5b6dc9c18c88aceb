package main

import (
	"context"
	"fmt"

	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// runRevoke measures RevokeLease against the same statement sequence sent
// bare (revokeBare: NOLOGIN and the admin's grant, committed; the
// sessions ended; DROP ROLE; no REASSIGN/DROP OWNED, since these users own
// nothing, which the bare client is told and the broker must find out),
// at --revoke-concurrency, on --revoke-n leases issued and as many users
// created (untimed) for the purpose. A bare DROP ROLE alone would measure
// against a sequence no correct revocation can send: it leaves open
// sessions running.
func (e *env) runRevoke(ctx context.Context, rep *report) error {
	k := e.opts.revokeN
	leases, err := e.issueMany(ctx, k)
	if err != nil {
		return fmt.Errorf("revoke setup: %w", err)
	}
	users, err := e.baselineUsers(ctx, "bench_v_", k)
	if err != nil {
		return fmt.Errorf("revoke setup: %w", err)
	}
	var rb, rk []result // one per round
	lc, uc := chunks(leases[:k], e.opts.rounds), chunks(users[:k], e.opts.rounds)
	for i := range min(len(lc), len(uc)) {
		brk := func() {
			rk = append(rk, eachOnce(ctx, e.opts.revokeConc, lc[i], func(ctx context.Context, id string) error {
				_, err := e.cred.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: id})
				return err
			}))
		}
		base := func() {
			rb = append(rb, eachOnce(ctx, e.opts.revokeConc, uc[i], func(ctx context.Context, u string) error {
				return e.revokeBare(ctx, u)
			}))
		}
		if i%2 == 0 {
			base()
			brk()
		} else {
			brk()
			base()
		}
	}
	errNote(rep, "revoke broker", mergeAll(rk))
	errNote(rep, "revoke baseline", mergeAll(rb))
	sc := fmt.Sprintf("revoke c=%d", e.opts.revokeConc)
	rep.add(tputLatencyRows(sc, rk, rb, true)...)
	return nil
}
