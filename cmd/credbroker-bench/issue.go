package main

import (
	"context"
	"fmt"
	"time"

	"github.com/credbroker/credbroker/broker/postgres"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// runIssue measures IssueCredential against the engine's CREATE ROLE
// transaction at each concurrency level. Phases alternate, baseline and
// broker, in --rounds rounds, so drift in the machine's load falls on both
// alike. Every level starts from the same catalog: what a level made is
// revoked and dropped (untimed) before the next, because PostgreSQL's cost
// per CREATE ROLE grows with the number of roles the admin is a member of.
// It returns the broker's throughput at 16 clients (0 if not measured).
func (e *env) runIssue(ctx context.Context, rep *report) (perSec16 float64) {
	var bIDs, bNames collector
	// baseline issues one user with the verifier verifier returns.
	baseline := func(verifier func() (string, error)) func(context.Context, int, int) error {
		return func(ctx context.Context, _, _ int) error {
			name := "bench_b_" + randHex(6)
			v, err := verifier()
			if err != nil {
				return err
			}
			if _, err := e.base.Exec(ctx, e.issueSQL(name, v, time.Now().Add(time.Hour+time.Minute))); err != nil {
				return err
			}
			bNames.add(name)
			return nil
		}
	}
	shared := baselineVerifier(e.opts.scramIterations)
	base := baseline(func() (string, error) { return shared, nil })
	// baseHashed is the baseline with its own verifier per user, hashed
	// by the client as the engine does: the work every credential needs
	// (--scram-iterations PBKDF2 iterations; at the default 4,096 about
	// 0.7 ms of CPU), which the strict baseline leaves out.
	baseHashed := baseline(func() (string, error) {
		return postgres.ScramSHA256VerifierIter(randHex(16), e.opts.scramIterations)
	})
	brk := func(ctx context.Context, _, _ int) error {
		resp, err := e.cred.IssueCredential(ctx, &pb.IssueCredentialRequest{Role: e.role})
		if err != nil {
			return err
		}
		bIDs.add(resp.GetLease().GetId())
		return nil
	}
	for _, c := range e.opts.levels {
		var rb, rk, rh result
		for r := range e.opts.rounds {
			if r%2 == 0 {
				rb.merge(closedLoop(ctx, c, e.opts.phase, base))
				rk.merge(closedLoop(ctx, c, e.opts.phase, brk))
			} else {
				rk.merge(closedLoop(ctx, c, e.opts.phase, brk))
				rb.merge(closedLoop(ctx, c, e.opts.phase, base))
			}
			if c == 16 {
				rh.merge(closedLoop(ctx, c, e.opts.phase, baseHashed))
			}
		}
		errNote(rep, fmt.Sprintf("issue c=%d broker", c), rk)
		errNote(rep, fmt.Sprintf("issue c=%d baseline", c), rb)
		sc := fmt.Sprintf("issue c=%d", c)
		tput := row{scenario: sc, figure: "throughput", broker: fmtRate(rk.perSec()), baseline: fmtRate(rb.perSec()), ratio: ratio(rk.perSec(), rb.perSec())}
		if c == 16 {
			perSec16 = rk.perSec()
			tput.target, tput.met = "≥ 0.90", verdict(rk.perSec() >= 0.9*rb.perSec())
		}
		rep.add(tput)
		if c == 16 {
			errNote(rep, "issue c=16 baseline hashing per user", rh)
			rep.add(row{scenario: sc, figure: "throughput, baseline hashing each user's password", broker: fmtRate(rk.perSec()),
				baseline: fmtRate(rh.perSec()), ratio: ratio(rk.perSec(), rh.perSec())})
		}
		p50 := row{scenario: sc, figure: "latency p50", broker: fmtDur(rk.pct(50)), baseline: fmtDur(rb.pct(50)), ratio: ratio(float64(rk.pct(50)), float64(rb.pct(50)))}
		if c == 1 {
			p50.target = "≤ baseline + 1ms"
			p50.met = verdict(rk.pct(50) <= rb.pct(50)+time.Millisecond)
			p50.ratio += fmt.Sprintf(" (+%s)", fmtDur(rk.pct(50)-rb.pct(50)))
		}
		rep.add(p50)
		rep.add(row{scenario: sc, figure: "latency p99", broker: fmtDur(rk.pct(99)), baseline: fmtDur(rb.pct(99)), ratio: ratio(float64(rk.pct(99)), float64(rb.pct(99)))})
		e.cleanup(ctx, rep, bIDs.take(), bNames.take())
	}
	if e.opts.profileDir != "" && e.broker != nil {
		// One more broker phase at 16 clients, profiled on its own: the
		// issue path is the broker's hottest.
		if err := e.profile("issue-c16.pprof", func() { closedLoop(ctx, 16, 2*e.opts.phase, brk) }); err != nil {
			rep.note("profile: %v", err)
		}
		e.cleanup(ctx, rep, bIDs.take(), bNames.take())
	}
	return perSec16
}
