package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/credbroker/credbroker/broker/postgres"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

// row is one line of the result table.
type row struct {
	scenario, figure, broker, baseline, ratio, target, met string
}

type report struct {
	mu    sync.Mutex
	rows  []row
	notes []string
	// live, if set, gets each row as it is measured, so an interrupted
	// run still shows what it measured.
	live io.Writer
}

func (r *report) add(x row) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.rows = append(r.rows, x)
	if r.live != nil {
		fmt.Fprintf(r.live, "  %s | %s | broker %s | baseline %s | ratio %s\n", x.scenario, x.figure, x.broker, x.baseline, x.ratio)
	}
}

func (r *report) note(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func fmtRate(v float64) string { return fmt.Sprintf("%.0f/s", v) }

func fmtDur(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return fmt.Sprintf("%.1fs", d.Seconds())
	case d >= time.Second:
		return fmt.Sprintf("%.2fs", d.Seconds())
	default:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
}

func ratio(a, b float64) string {
	if b == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func verdict(ok bool) string {
	if ok {
		return "yes"
	}
	return "NO"
}

// errNote says how many operations failed, and the first error.
func errNote(rep *report, what string, r result) {
	if r.errs > 0 {
		rep.note("%s: %d operations failed; first: %v", what, r.errs, r.firstErr)
	}
}

// users collects the names (baseline) or lease ids (broker) a phase made.
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

// issued is a lease the broker issued, with what the expiry scenario needs.
type issued struct {
	id, username string
	expire       time.Time
}

// verifier is one SCRAM verifier the baseline uses for every user: the
// hashing is client-side work, not SQL, so the ceiling leaves it out.
func baselineVerifier() string {
	v, err := postgres.ScramSHA256Verifier(randHex(16))
	if err != nil {
		panic(err)
	}
	return v
}

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
	shared := baselineVerifier()
	base := baseline(func() (string, error) { return shared, nil })
	// baseHashed is the baseline with its own verifier per user, hashed
	// by the client as the engine does: the work every credential needs
	// (4,096 PBKDF2 iterations, about 0.7 ms of CPU), which the strict
	// baseline leaves out.
	baseHashed := baseline(func() (string, error) { return postgres.ScramSHA256Verifier(randHex(16)) })
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

// runRenew measures RenewLease (unary) and the KeepAlive stream against
// ALTER ROLE ... VALID UNTIL, at --renew-concurrency.
func (e *env) runRenew(ctx context.Context, rep *report) error {
	c, per := e.opts.renewConc, e.opts.renewPerWorker
	n := c * per
	verifier := baselineVerifier()
	leases, err := e.issueMany(ctx, n)
	if err != nil {
		return fmt.Errorf("renew setup: %w", err)
	}
	names := make([]string, n)
	for i := range names {
		names[i] = "bench_r_" + randHex(6)
	}
	if err := e.bulk(ctx, names, func(u string) string { return e.issueSQL(u, verifier, time.Now().Add(time.Hour)) }); err != nil {
		return fmt.Errorf("renew setup: %w", err)
	}
	defer e.cleanup(ctx, rep, leases, names)

	base := func(ctx context.Context, w, k int) error {
		_, err := e.base.Exec(ctx, renewSQL(names[w*per+k%per], time.Now().Add(time.Hour+time.Minute)))
		return err
	}
	unary := func(ctx context.Context, w, k int) error {
		_, err := e.cred.RenewLease(ctx, &pb.RenewLeaseRequest{LeaseId: leases[w*per+k%per]})
		return err
	}
	var rb, ru, rs result
	for r := range e.opts.rounds {
		streams, err := e.openStreams(ctx, c)
		if err != nil {
			return err
		}
		stream := func(ctx context.Context, w, k int) error {
			return streams[w].renew(leases[w*per+k%per])
		}
		phases := []func(){
			func() { rb.merge(closedLoop(ctx, c, e.opts.phase, base)) },
			func() { ru.merge(closedLoop(ctx, c, e.opts.phase, unary)) },
			func() { rs.merge(closedLoop(ctx, c, e.opts.phase, stream)) },
		}
		for i := range phases {
			phases[(i+r)%len(phases)]()
		}
		for _, s := range streams {
			s.close()
		}
	}
	if e.opts.profileDir != "" && e.broker != nil {
		// One more stream phase, profiled on its own.
		streams, err := e.openStreams(ctx, c)
		if err != nil {
			return err
		}
		stream := func(ctx context.Context, w, k int) error { return streams[w].renew(leases[w*per+k%per]) }
		if err := e.profile("renew-stream.pprof", func() { closedLoop(ctx, c, 2*e.opts.phase, stream) }); err != nil {
			rep.note("profile: %v", err)
		}
		for _, s := range streams {
			s.close()
		}
	}
	errNote(rep, "renew baseline", rb)
	errNote(rep, "renew unary", ru)
	errNote(rep, "renew stream", rs)
	sc := fmt.Sprintf("renew c=%d", c)
	rep.add(row{scenario: sc + " stream", figure: "throughput", broker: fmtRate(rs.perSec()), baseline: fmtRate(rb.perSec()),
		ratio: ratio(rs.perSec(), rb.perSec()), target: "≥ 0.90", met: verdict(rs.perSec() >= 0.9*rb.perSec())})
	rep.add(row{scenario: sc + " stream", figure: "latency p50 / p99", broker: fmtDur(rs.pct(50)) + " / " + fmtDur(rs.pct(99)),
		baseline: fmtDur(rb.pct(50)) + " / " + fmtDur(rb.pct(99)), ratio: ratio(float64(rs.pct(50)), float64(rb.pct(50)))})
	rep.add(row{scenario: sc + " unary", figure: "throughput", broker: fmtRate(ru.perSec()), baseline: fmtRate(rb.perSec()),
		ratio: ratio(ru.perSec(), rb.perSec())})
	rep.add(row{scenario: sc + " unary", figure: "latency p50 / p99", broker: fmtDur(ru.pct(50)) + " / " + fmtDur(ru.pct(99)),
		baseline: fmtDur(rb.pct(50)) + " / " + fmtDur(rb.pct(99)), ratio: ratio(float64(ru.pct(50)), float64(rb.pct(50)))})
	return nil
}

// keepAlive is one KeepAlive stream used closed-loop: one renewal in flight.
type keepAlive struct {
	s      pb.CredentialService_KeepAliveClient
	cancel context.CancelFunc
	last   map[string]int64 // newest expire_time seen per lease, unix ns
}

func (e *env) openStreams(ctx context.Context, n int) ([]*keepAlive, error) {
	out := make([]*keepAlive, n)
	for i := range out {
		sctx, cancel := context.WithCancel(ctx)
		s, err := e.cred.KeepAlive(sctx)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("open KeepAlive stream: %w", err)
		}
		out[i] = &keepAlive{s: s, cancel: cancel, last: map[string]int64{}}
	}
	return out, nil
}

// renew asks for one renewal and waits for the answer naming that lease
// with a later expiry than seen before (a pushed event for another lease,
// or a repeat, is skipped).
func (k *keepAlive) renew(id string) error {
	if err := k.s.Send(&pb.KeepAliveRequest{LeaseId: id}); err != nil {
		return err
	}
	for {
		resp, err := k.s.Recv()
		if err != nil {
			return err
		}
		l := resp.GetLease()
		exp := l.GetExpireTime().AsTime().UnixNano()
		if l.GetId() != id || exp <= k.last[id] {
			if l.GetId() != "" && exp > k.last[l.GetId()] {
				k.last[l.GetId()] = exp
			}
			continue
		}
		k.last[id] = exp
		switch resp.GetEvent() {
		case pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED, pb.KeepAliveEvent_KEEP_ALIVE_EVENT_MAX_TTL_REACHED:
			return nil
		default:
			return fmt.Errorf("keepalive %s: event %s %s", id, resp.GetEvent(), resp.GetMessage())
		}
	}
}

func (k *keepAlive) close() {
	_ = k.s.CloseSend()
	k.cancel()
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
	for _, part := range chunks(leases, (len(leases)+499)/500) {
		if _, err := e.adminC.RevokeLeases(ctx, &pb.RevokeLeasesRequest{LeaseIds: part}); err != nil {
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

// runRevoke measures RevokeLease against DROP ROLE of users without
// sessions, at --revoke-concurrency, on --revoke-n leases issued and as
// many users created (untimed) for the purpose.
func (e *env) runRevoke(ctx context.Context, rep *report) error {
	k := e.opts.revokeN
	leases, err := e.issueMany(ctx, k)
	if err != nil {
		return fmt.Errorf("revoke setup: %w", err)
	}
	users := make([]string, k)
	for i := range users {
		users[i] = "bench_v_" + randHex(6)
	}
	verifier := baselineVerifier()
	if err := e.bulk(ctx, users, func(u string) string { return e.issueSQL(u, verifier, time.Now().Add(time.Hour)) }); err != nil {
		return fmt.Errorf("revoke setup: %w", err)
	}
	var rb, rk result
	lc, uc := chunks(leases[:k], e.opts.rounds), chunks(users[:k], e.opts.rounds)
	for i := range min(len(lc), len(uc)) {
		brk := func() {
			rk.merge(eachOnce(ctx, e.opts.revokeConc, lc[i], func(ctx context.Context, id string) error {
				_, err := e.cred.RevokeLease(ctx, &pb.RevokeLeaseRequest{LeaseId: id})
				return err
			}))
		}
		base := func() {
			rb.merge(eachOnce(ctx, e.opts.revokeConc, uc[i], func(ctx context.Context, u string) error {
				_, err := e.base.Exec(ctx, dropSQL(u))
				return err
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
	errNote(rep, "revoke broker", rk)
	errNote(rep, "revoke baseline", rb)
	sc := fmt.Sprintf("revoke c=%d", e.opts.revokeConc)
	rep.add(row{scenario: sc, figure: "throughput", broker: fmtRate(rk.perSec()), baseline: fmtRate(rb.perSec()), ratio: ratio(rk.perSec(), rb.perSec())})
	rep.add(row{scenario: sc, figure: "latency p50 / p99", broker: fmtDur(rk.pct(50)) + " / " + fmtDur(rk.pct(99)),
		baseline: fmtDur(rb.pct(50)) + " / " + fmtDur(rb.pct(99)), ratio: ratio(float64(rk.pct(50)), float64(rb.pct(50)))})
	return nil
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

// runExpiry measures an expiry burst: N leases issued so that they all
// expire at the same instant, and the time until the expiry manager has
// dropped every user, watched from outside (pg_roles polled every
// --poll). Baseline: N DROP ROLEs at the broker's revoke concurrency.
func (e *env) runExpiry(ctx context.Context, rep *report, issueRate float64) error {
	n := e.opts.expiryN
	verifier := baselineVerifier()

	// Baseline first: create N users (untimed), then drop them all at
	// once at the broker's revoke concurrency.
	names := make([]string, n)
	for i := range names {
		names[i] = "bench_x_" + randHex(6)
	}
	if err := e.bulk(ctx, names, func(u string) string { return e.issueSQL(u, verifier, time.Now().Add(time.Hour)) }); err != nil {
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
