package issuer

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/window"
)

// challenge is the locked state of one (tenant, request_id) inside a batch transaction.
type challenge struct {
	id         string
	codeCount  int
	lastCodeAt time.Time
	status     string
	recipient  string // canonical: what requests are compared with
	address    string // as the challenge was created: where its codes go
	purpose    string
	isNew      bool
}

type key struct{ tenant, requestID string }

// rcptKey names one (tenant, recipient, purpose): the unit of cooldowns, hourly caps,
// supersede and bursts.
type rcptKey struct{ tenant, recipient, purpose string }

func (k rcptKey) rate() string        { return "rcpt|" + k.tenant + "|" + k.recipient + "|" + k.purpose }
func ipRate(tenant, ip string) string { return "ip|" + tenant + "|" + ip }
func tenantRate(tenant string) string { return "tenant|" + tenant }

// batchState is everything the decisions of one batch read and change, loaded under row
// locks so that several issuer processes decide as if they were one.
type batchState struct {
	now        time.Time // the database clock once the rows are locked
	challenges map[key]*challenge
	logs       map[string]window.Stamps   // rate_log rows: send times per key
	windows    map[string]*rateWindow     // rate_window rows
	active     map[rcptKey][]activeRef    // active unexpired challenges per recipient
	recent     map[rcptKey]window.Stamps  // creation times of recent challenges
	ipSeen     map[string]map[string]bool // tenant|ip -> recipients seen in the fanout window
	dirtyLogs  map[string]bool
	dirtyWins  map[string]bool
	ipTouched  map[string]map[string]bool // tenant|ip -> recipients to record
}

type rateWindow struct {
	start time.Time
	count int
}

type activeRef struct{ id, requestID string }

// issue decides every valid request of the batch in one transaction: a new challenge, a
// duplicate, a resend or a refusal. It returns the committed outbox entries.
func (s *Service) issue(ctx context.Context, reqs []*request) ([]outbox.Entry, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	var entries []outbox.Entry
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		entries = nil
		start, err := s.clock(ctx, tx)
		if err != nil {
			return err
		}
		st, err := s.lock(ctx, tx, reqs, start)
		if err != nil {
			return err
		}
		// Decisions run on the clock as read once the locks are held, so an issuer that
		// waited for another's locks decides after it, never in its past.
		now := st.now
		writes := &pgx.Batch{}
		var msgs []*nats.Msg
		for _, r := range reqs {
			out, err := s.decide(st, writes, r, now)
			if err != nil {
				return err
			}
			msgs = append(msgs, out...)
		}
		s.writeLimits(st, writes, now)
		if err := tx.SendBatch(ctx, writes).Close(); err != nil {
			return fmt.Errorf("write challenges: %w", err)
		}
		entries, err = s.outbox.Add(ctx, tx, msgs...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return entries, nil
}

// lock reads and row-locks the batch's challenges, then its rate-limit rows, each set in
// sorted order so that issuers never deadlock, reads what the rules need (windows as of
// start), and then the database clock.
func (s *Service) lock(ctx context.Context, tx pgx.Tx, reqs []*request, now time.Time) (*batchState, error) {
	st := &batchState{challenges: map[key]*challenge{}, logs: map[string]window.Stamps{}, windows: map[string]*rateWindow{},
		active: map[rcptKey][]activeRef{}, recent: map[rcptKey]window.Stamps{}, ipSeen: map[string]map[string]bool{},
		dirtyLogs: map[string]bool{}, dirtyWins: map[string]bool{}, ipTouched: map[string]map[string]bool{}}

	var ks []key
	rcpts := map[rcptKey]bool{}
	logKeys, winKeys, ips := map[string]bool{}, map[string]bool{}, map[string][2]string{}
	for _, r := range reqs {
		k := key{r.tenant, r.req.RequestID}
		if _, ok := st.challenges[k]; !ok {
			st.challenges[k] = nil
			ks = append(ks, k)
		}
		rk := rcptKey{r.tenant, events.CanonicalAddress(r.req.Recipient), r.req.Purpose}
		rcpts[rk] = true
		logKeys[rk.rate()] = true
		winKeys[tenantRate(r.tenant)] = true
		if ip := r.client(); ip != "" {
			logKeys[ipRate(r.tenant, ip)] = true
			ips[r.tenant+"|"+ip] = [2]string{r.tenant, ip}
		}
	}
	slices.SortFunc(ks, func(a, b key) int {
		if c := strings.Compare(a.tenant, b.tenant); c != 0 {
			return c
		}
		return strings.Compare(a.requestID, b.requestID)
	})
	// Set-based reads, a handful of statements per batch whatever its size. Rows are
	// locked in key order (the sort runs below the row locks).
	var tenants, requestIDs []string
	for _, k := range ks {
		tenants, requestIDs = append(tenants, k.tenant), append(requestIDs, k.requestID)
	}
	sortedLogs, sortedWins := sortedKeys(logKeys), sortedKeys(winKeys)
	var rt, rr, rp []string
	for rk := range rcpts {
		rt, rr, rp = append(rt, rk.tenant), append(rr, rk.recipient), append(rp, rk.purpose)
	}
	var it, ii []string
	for _, v := range ips {
		it, ii = append(it, v[0]), append(ii, v[1])
	}
	b := &pgx.Batch{}
	b.Queue(`SELECT c.tenant, c.request_id, c.challenge_id::text, c.code_count, c.last_code_at, c.status, c.recipient_key, c.recipient, c.purpose
		FROM issuer.challenges c JOIN unnest($1::text[], $2::text[]) AS k(tenant, request_id) USING (tenant, request_id)
		ORDER BY c.tenant, c.request_id FOR UPDATE OF c`, tenants, requestIDs).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var k key
			var c challenge
			if err := rows.Scan(&k.tenant, &k.requestID, &c.id, &c.codeCount, &c.lastCodeAt, &c.status, &c.recipient, &c.address, &c.purpose); err != nil {
				return err
			}
			st.challenges[k] = &c
		}
		return rows.Err()
	})
	b.Queue(`INSERT INTO issuer.rate_log (key) SELECT k FROM unnest($1::text[]) AS k ORDER BY k ON CONFLICT DO NOTHING`, sortedLogs)
	b.Queue(`SELECT key, stamps FROM issuer.rate_log WHERE key = ANY($1) ORDER BY key FOR UPDATE`, sortedLogs).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var k string
			var stamps []time.Time
			if err := rows.Scan(&k, &stamps); err != nil {
				return err
			}
			st.logs[k] = stamps
		}
		return rows.Err()
	})
	b.Queue(`INSERT INTO issuer.rate_window (key, window_start, count) SELECT k, $2, 0 FROM unnest($1::text[]) AS k ORDER BY k
		ON CONFLICT DO NOTHING`, sortedWins, now)
	b.Queue(`SELECT key, window_start, count FROM issuer.rate_window WHERE key = ANY($1) ORDER BY key FOR UPDATE`, sortedWins).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var k string
			w := &rateWindow{}
			if err := rows.Scan(&k, &w.start, &w.count); err != nil {
				return err
			}
			st.windows[k] = w
		}
		return rows.Err()
	})
	b.Queue(`SELECT c.tenant, c.recipient_key, c.purpose, c.challenge_id::text, c.request_id, c.status = 'active' AND c.expires_at > $4, c.created_at
		FROM issuer.challenges c JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, recipient_key, purpose)
			USING (tenant, recipient_key, purpose)
		WHERE c.created_at > $5 OR (c.status = 'active' AND c.expires_at > $4)
		ORDER BY c.created_at`, rt, rr, rp, now, now.Add(-time.Hour)).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var rk rcptKey
			var a activeRef
			var active bool
			var created time.Time
			if err := rows.Scan(&rk.tenant, &rk.recipient, &rk.purpose, &a.id, &a.requestID, &active, &created); err != nil {
				return err
			}
			if active {
				st.active[rk] = append(st.active[rk], a)
			}
			if created.After(now.Add(-time.Hour)) {
				st.recent[rk] = st.recent[rk].Add(created)
			}
		}
		return rows.Err()
	})
	if len(it) > 0 {
		b.Queue(`SELECT r.tenant, r.ip, r.recipient_key, r.last_at FROM issuer.ip_recipients r
			JOIN unnest($1::text[], $2::text[]) AS k(tenant, ip) USING (tenant, ip)
			WHERE r.last_at > $3`, it, ii, now.Add(-time.Hour)).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var tenant, ip, rcpt string
				var last time.Time
				if err := rows.Scan(&tenant, &ip, &rcpt, &last); err != nil {
					return err
				}
				if last.After(now.Add(-s.cfg.Policies.For(tenant).Risk.IPFanout.Window)) {
					k := tenant + "|" + ip
					if st.ipSeen[k] == nil {
						st.ipSeen[k] = map[string]bool{}
					}
					st.ipSeen[k][rcpt] = true
				}
			}
			return rows.Err()
		})
	}
	b.Queue(`SELECT clock_timestamp()`).QueryRow(func(row pgx.Row) error { return row.Scan(&st.now) })
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return nil, fmt.Errorf("lock batch state: %w", err)
	}
	st.now = st.now.Add(s.skewBy()).UTC()
	return st, nil
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// decide settles one request against the batch state and queues its writes; it returns
// the messages to publish through the outbox.
func (s *Service) decide(st *batchState, writes *pgx.Batch, r *request, now time.Time) ([]*nats.Msg, error) {
	r.reject, r.outcome = nil, ""
	p := s.cfg.Policies.For(r.tenant)
	refuse := func(reason events.RejectReason, limit, detail string, retryAfter time.Duration) {
		secs := 0
		if retryAfter > 0 {
			secs = int((retryAfter + time.Second - 1) / time.Second)
		}
		r.reject = &events.Rejected{Tenant: r.tenant, RequestID: r.req.RequestID, Reason: reason, Limit: limit,
			Detail: detail, RetryAfterSeconds: secs, RequestSeq: r.seq, RejectedAt: now.UTC()}
	}
	if !p.AllowsPurpose(r.req.Purpose) {
		refuse(events.ReasonPolicy, "", "purpose not allowed for this tenant", 0)
		r.reject.Field = "purpose"
		return nil, nil
	}
	ttl := p.TTL
	if r.req.TTLSeconds > 0 {
		ttl = time.Duration(r.req.TTLSeconds) * time.Second
	}
	if ttl > p.MaxTTL {
		refuse(events.ReasonPolicy, "", fmt.Sprintf("ttl_seconds is over the tenant maximum of %d", int(p.MaxTTL.Seconds())), 0)
		r.reject.Field = "ttl_seconds"
		return nil, nil
	}
	k := key{r.tenant, r.req.RequestID}
	rk := rcptKey{r.tenant, events.CanonicalAddress(r.req.Recipient), r.req.Purpose}
	testCode, isTest := p.TestCode(r.req.Recipient)
	c := st.challenges[k]
	switch {
	case c != nil && (c.recipient != rk.recipient || c.purpose != rk.purpose):
		// The request id names a challenge of another address or purpose: its code
		// (or a fresh one) must never go there. The challenge itself is untouched.
		refuse(events.ReasonChallengeMismatch, "", "this request_id belongs to a challenge for another recipient or purpose", 0)
		return nil, nil
	case c != nil && !r.req.Resend:
		r.outcome = "duplicate"
		return nil, nil
	case c != nil && c.status == "superseded":
		refuse(events.ReasonChallengeClosed, "", "this challenge was superseded by a newer request", 0)
		return nil, nil
	case c != nil && c.codeCount >= p.MaxSends:
		refuse(events.ReasonRateLimited, "max_sends", "this challenge reached its send cap; start a new request", 0)
		return nil, nil
	case c != nil && now.Sub(c.lastCodeAt) < p.ResendCooldown:
		refuse(events.ReasonRateLimited, "resend_cooldown", "resend cooldown", p.ResendCooldown-now.Sub(c.lastCodeAt))
		return nil, nil
	}
	ipKey := r.tenant + "|" + r.client()
	if c == nil && r.client() != "" && p.Risk.IPFanout.Recipients > 0 {
		seen := st.ipSeen[ipKey]
		if !seen[rk.recipient] && len(seen) >= p.Risk.IPFanout.Recipients {
			refuse(events.ReasonRisk, "ip_fanout", "this client asked codes for too many recipients", p.Risk.IPFanout.Window)
			return nil, nil
		}
	}
	// Test recipients obey every limit: a fixed code is only as safe as the limits on
	// guessing it.
	if limit, wait := s.overLimit(st, p, r, rk, now); limit != "" {
		refuse(events.ReasonRateLimited, limit, strings.ReplaceAll(limit, "_", " ")+" limit", wait)
		return nil, nil
	}
	s.recordSend(st, r, rk, now)

	maxAttempts := p.MaxAttempts
	var risk []string
	if c == nil {
		if b := p.Risk.RecipientBurst; b.Challenges > 0 && st.recent[rk].Count(now.Add(-b.Window)) >= b.Challenges {
			ttl, maxAttempts = min(ttl, b.TTL), min(maxAttempts, b.MaxAttempts)
			risk = append(risk, "recipient_burst")
		}
		c = &challenge{id: newID(), isNew: true, status: "active", recipient: rk.recipient, address: r.req.Recipient, purpose: rk.purpose}
		st.challenges[k] = c
		st.recent[rk] = st.recent[rk].Add(now)
		r.outcome = "issued"
	} else {
		r.outcome = "resent"
	}
	c.codeCount++
	c.lastCodeAt = now

	var msgs []*nats.Msg
	if c.isNew && c.codeCount == 1 {
		for _, old := range st.active[rk] {
			writes.Queue(`UPDATE issuer.challenges SET status = 'superseded', superseded_by = $2 WHERE challenge_id = $1`, old.id, r.req.RequestID)
			m, err := events.NewMsg(events.TypeSuperseded, r.tenant, "superseded:"+old.id, old.id, events.Superseded{
				ChallengeID: old.id, Tenant: r.tenant, RequestID: old.requestID, SupersededBy: r.req.RequestID,
				SupersededAt: now.UTC(), Test: isTest}, s.envelope(r.msg, now))
			if err != nil {
				return nil, err
			}
			msgs = append(msgs, m)
		}
		st.active[rk] = []activeRef{{id: c.id, requestID: r.req.RequestID}}
	}
	out, err := s.newCode(writes, r, c, codeParams{policy: p, ttl: ttl, maxAttempts: maxAttempts, testCode: testCode, test: isTest, risk: risk}, now)
	if err != nil {
		return nil, err
	}
	return append(msgs, out...), nil
}

// overLimit checks the rate limits of one send and names the first one it would break,
// with how long until it would not.
func (s *Service) overLimit(st *batchState, p policy.Policy, r *request, rk rcptKey, now time.Time) (string, time.Duration) {
	rl := p.RateLimits
	stamps := st.logs[rk.rate()].Trim(now.Add(-time.Hour))
	if rl.RecipientCooldown > 0 && len(stamps) > 0 {
		if wait := stamps.KthNewest(1).Add(rl.RecipientCooldown).Sub(now); wait > 0 {
			return "recipient_cooldown", wait
		}
	}
	if rl.RecipientPerHour > 0 && len(stamps) >= rl.RecipientPerHour {
		return "recipient_per_hour", stamps.KthNewest(rl.RecipientPerHour).Add(time.Hour).Sub(now)
	}
	if ip := r.client(); ip != "" && rl.IPPerMinute > 0 {
		if ipStamps := st.logs[ipRate(r.tenant, ip)].Trim(now.Add(-time.Minute)); len(ipStamps) >= rl.IPPerMinute {
			return "ip_per_minute", ipStamps.KthNewest(rl.IPPerMinute).Add(time.Minute).Sub(now)
		}
	}
	if rl.TenantPerMinute > 0 {
		w := st.windows[tenantRate(r.tenant)]
		if now.Sub(w.start) < time.Minute && w.count >= rl.TenantPerMinute {
			return "tenant_per_minute", w.start.Add(time.Minute).Sub(now)
		}
	}
	return "", 0
}

// recordSend counts one send against every limit of the request.
func (s *Service) recordSend(st *batchState, r *request, rk rcptKey, now time.Time) {
	st.logs[rk.rate()] = st.logs[rk.rate()].Trim(now.Add(-time.Hour)).Add(now)
	st.dirtyLogs[rk.rate()] = true
	if ip := r.client(); ip != "" {
		ik := ipRate(r.tenant, ip)
		st.logs[ik] = st.logs[ik].Trim(now.Add(-time.Hour)).Add(now)
		st.dirtyLogs[ik] = true
		key := r.tenant + "|" + ip
		if st.ipSeen[key] == nil {
			st.ipSeen[key] = map[string]bool{}
		}
		st.ipSeen[key][rk.recipient] = true
		if st.ipTouched[key] == nil {
			st.ipTouched[key] = map[string]bool{}
		}
		st.ipTouched[key][rk.recipient] = true
	}
	w := st.windows[tenantRate(r.tenant)]
	if now.Sub(w.start) >= time.Minute {
		w.start, w.count = now, 0
	}
	w.count++
	st.dirtyWins[tenantRate(r.tenant)] = true
}

// writeLimits queues the changed rate-limit rows.
func (s *Service) writeLimits(st *batchState, writes *pgx.Batch, now time.Time) {
	for k := range st.dirtyLogs {
		writes.Queue(`UPDATE issuer.rate_log SET stamps = $2 WHERE key = $1`, k, []time.Time(st.logs[k].Trim(now.Add(-time.Hour))))
	}
	for k := range st.dirtyWins {
		w := st.windows[k]
		writes.Queue(`UPDATE issuer.rate_window SET window_start = $2, count = $3 WHERE key = $1`, k, w.start, w.count)
	}
	for key, rcpts := range st.ipTouched {
		tenant, ip, _ := strings.Cut(key, "|")
		for rc := range rcpts {
			writes.Queue(`INSERT INTO issuer.ip_recipients (tenant, ip, recipient_key, last_at) VALUES ($1, $2, $3, $4)
				ON CONFLICT (tenant, ip, recipient_key) DO UPDATE SET last_at = EXCLUDED.last_at`, tenant, ip, rc, now)
		}
	}
}

type codeParams struct {
	policy      policy.Policy
	ttl         time.Duration
	maxAttempts int
	testCode    string
	test        bool
	risk        []string
}

// newCode draws code number c.codeCount of challenge c, queues its rows, and returns the
// issued event (HMAC only) and, unless the recipient is a test recipient, the dispatch
// job (sealed code).
func (s *Service) newCode(writes *pgx.Batch, r *request, c *challenge, cp codeParams, now time.Time) ([]*nats.Msg, error) {
	expires := now.Add(cp.ttl)
	code := cp.testCode
	if !cp.test {
		var err error
		if code, err = newCode(cp.policy.CodeLength, cp.policy.Alphabet); err != nil {
			return nil, fmt.Errorf("draw code: %w", err)
		}
	}
	pepperID := s.cfg.Pepper.ActiveID()
	mac, err := s.cfg.Pepper.MAC(pepperID, c.id, code)
	if err != nil {
		return nil, err
	}
	if c.isNew && c.codeCount == 1 {
		writes.Queue(`INSERT INTO issuer.challenges (tenant, request_id, challenge_id, recipient, recipient_key, purpose, locale,
			session_id, code_count, last_code_at, expires_at, created_at, test, client_ip)
			VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$10,$12,$13)`,
			r.tenant, r.req.RequestID, c.id, c.address, c.recipient, r.req.Purpose, r.req.Locale,
			r.req.Context.SessionID, c.codeCount, now, expires, cp.test, r.req.Context.IP)
	} else {
		writes.Queue(`UPDATE issuer.challenges SET code_count = $2, last_code_at = $3, expires_at = $4
			WHERE challenge_id = $1`, c.id, c.codeCount, now, expires)
	}
	writes.Queue(`INSERT INTO issuer.codes (challenge_id, code_seq, code_hmac, pepper_key_id, issued_at, expires_at)
		VALUES ($1,$2,$3,$4,$5,$6)`, c.id, c.codeCount, mac, pepperID, now, expires)

	locale := r.req.Locale
	if locale == "" {
		locale = cp.policy.Locale
	}
	env := s.envelope(r.msg, now)
	issued := events.Issued{
		ChallengeID: c.id, Tenant: r.tenant, RequestID: r.req.RequestID, CodeSeq: c.codeCount,
		Recipient: c.address, Purpose: r.req.Purpose, Locale: locale,
		CodeLength: cp.policy.CodeLength, CodeHMAC: mac, PepperKeyID: pepperID, MaxAttempts: cp.maxAttempts,
		SessionID: r.req.Context.SessionID, ClientIP: r.req.Context.IP, Resend: c.codeCount > 1,
		IssuedAt: now.UTC(), ExpiresAt: expires.UTC(), RequestedAt: r.stored, Test: cp.test, Risk: cp.risk,
	}
	im, err := events.NewMsg(events.TypeIssued, r.tenant, fmt.Sprintf("issued:%s:%d", c.id, c.codeCount), c.id, issued, env)
	if err != nil {
		return nil, err
	}
	if cp.test {
		return []*nats.Msg{im}, nil // a test recipient is never mailed
	}
	// The whole job is sealed: whoever can read or write OTP_DISPATCH can neither learn
	// the code or the address nor redirect, renumber or re-time the mail.
	job, err := s.cfg.Sealer.SealJob(events.DispatchJob{
		ChallengeID: c.id, Tenant: r.tenant, RequestID: r.req.RequestID, CodeSeq: c.codeCount,
		Recipient: c.address, Purpose: r.req.Purpose, Locale: locale,
		IssuedAt: now.UTC(), ExpiresAt: expires.UTC(), Code: code,
	})
	if err != nil {
		return nil, fmt.Errorf("seal dispatch job: %w", err)
	}
	jm, err := events.NewMsg(events.TypeDispatch, r.tenant, fmt.Sprintf("dispatch:%s:%d", c.id, c.codeCount), c.id, job, env)
	if err != nil {
		return nil, err
	}
	// The issued event goes first: the verifier should know the challenge before the
	// user can read the mail.
	return []*nats.Msg{im, jm}, nil
}
