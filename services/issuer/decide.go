package issuer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/policy"
)

type key struct{ tenant, requestID string }

// msgKey names one request message of a tenant by the SHA-256 (hex) of its identity
// (events.RequestMessageIdentity): what a resend is recognised by.
type msgKey struct{ tenant, hash string }

func (r *request) msgKey() msgKey {
	sum := sha256.Sum256([]byte(r.message))
	return msgKey{r.tenant, hex.EncodeToString(sum[:])}
}

// rcptKey names one (tenant, recipient, purpose): the unit of cooldowns, hourly caps,
// supersede and bursts. The recipient is its subject hash under the active key.
type rcptKey struct{ tenant, recipient, purpose string }

func (k rcptKey) rate() string { return rcptRate(k.tenant, k.recipient, k.purpose) }

// Rate-limit keys name a recipient and a client by subject hash, never in plaintext.
func rcptRate(tenant, hash, purpose string) string {
	return "rcpt|" + tenant + "|" + hash + "|" + purpose
}
func ipRate(tenant, hash string) string { return "ip|" + tenant + "|" + hash }
func tenantRate(tenant string) string   { return "tenant|" + tenant }

// issue decides every valid request of the batch in one transaction: a new challenge, a
// duplicate, a resend or a refusal. It returns the committed outbox entries.
func (s *Service) issue(ctx context.Context, reqs []*request) ([]outbox.Entry, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	for _, r := range reqs {
		s.identify(r)
	}
	return s.store.issueBatch(ctx, s.keysOf(reqs), func(st *batchState, w *writes) error {
		// Decisions run on the clock as read once the locks are held, so an issuer that
		// waited for another's locks decides after it, never in its past.
		for _, r := range reqs {
			if err := s.decide(st, w, r, st.now); err != nil {
				return err
			}
		}
		return nil
	})
}

// keysOf names the rows the decisions on reqs read and change.
func (s *Service) keysOf(reqs []*request) batchKeys {
	ks := batchKeys{challenges: map[key]bool{}, recipients: map[rcptKey][]string{}, logs: map[string][]string{},
		windows: map[string]bool{}, clients: map[clientKey]clientRows{}, messages: map[msgKey]bool{}}
	for _, r := range reqs {
		ks.challenges[key{r.tenant, r.req.RequestID}] = true
		if r.req.Resend {
			ks.messages[r.msgKey()] = true
		}
		rk := r.rcptKey()
		ks.recipients[rk] = r.subjects
		ks.logs[rk.rate()] = r.rcptRates()
		ks.windows[tenantRate(r.tenant)] = true
		if ck, ok := r.clientKey(); ok {
			ks.logs[ipRate(r.tenant, ck.ip)] = r.ipRates()
			ks.clients[ck] = clientRows{hashes: r.clients, window: s.cfg.Policies.For(r.tenant).Risk.IPFanout.Window}
		}
	}
	return ks
}

// decide settles one request against the batch state and records its writes and the
// messages to publish through the outbox in w.
//
// A resend is settled once per message: its request id names the challenge, which every
// resend of it shares, so the message's identity is what tells a second handling of one
// message (a redelivery after a lost ack or a database outage, a redrive from OTP_DLQ)
// from a new resend. Whatever the first handling decided (a code, or a refusal such as
// resend_cooldown) is recorded with it, and its events go through the outbox in the same
// transaction; a second handling is a duplicate: acknowledged, nothing decided or sent.
func (s *Service) decide(st *batchState, w *writes, r *request, now time.Time) error {
	r.reject, r.queued, r.outcome = nil, false, ""
	if !r.req.Resend {
		return s.settle(st, w, r, now)
	}
	mk := r.msgKey()
	if st.handled[mk] {
		r.outcome = "duplicate"
		return nil
	}
	if err := s.settle(st, w, r, now); err != nil {
		return err
	}
	st.handled[mk] = true
	w.add(handledMessage{key: mk, recipient: r.rcptKey().recipient, at: now})
	if r.reject != nil {
		m, err := events.NewMsg(events.TypeRejected, r.tenant, fmt.Sprintf("rejected:%d", r.seq), "", r.reject, s.envelope(r, now))
		if err != nil {
			return err
		}
		w.publish(m)
		r.queued = true
	}
	return nil
}

// settle decides one request, for decide.
func (s *Service) settle(st *batchState, w *writes, r *request, now time.Time) error {
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
		return nil
	}
	ttl := p.TTL
	if r.req.TTLSeconds > 0 {
		ttl = time.Duration(r.req.TTLSeconds) * time.Second
	}
	if ttl > p.MaxTTL {
		refuse(events.ReasonPolicy, "", fmt.Sprintf("ttl_seconds is over the tenant maximum of %d", int(p.MaxTTL.Seconds())), 0)
		r.reject.Field = "ttl_seconds"
		return nil
	}
	k := key{r.tenant, r.req.RequestID}
	rk := r.rcptKey()
	testCode, isTest := p.TestCode(r.req.Recipient)
	c := st.challenges[k]
	switch {
	case c != nil && c.recipient == "" && !r.req.Resend:
		// A challenge from before recipients were hashed: nothing to compare with, and
		// nothing is sent for a repeat.
		r.outcome = "duplicate"
		return nil
	case c != nil && c.recipient == "":
		refuse(events.ReasonChallengeClosed, "", "this challenge predates an upgrade and cannot be resent; start a new request", 0)
		return nil
	case c != nil && (!s.cfg.Subjects.MatchesSubject(c.recipient, r.tenant, r.req.Recipient) || c.purpose != rk.purpose):
		// The request id names a challenge of another address or purpose: its code
		// (or a fresh one) must never go there. The challenge itself is untouched.
		refuse(events.ReasonChallengeMismatch, "", "this request_id belongs to a challenge for another recipient or purpose", 0)
		return nil
	case c != nil && !r.req.Resend:
		r.outcome = "duplicate"
		return nil
	case c != nil && c.status == "superseded":
		refuse(events.ReasonChallengeClosed, "", "this challenge was superseded by a newer request", 0)
		return nil
	case c != nil && c.codeCount >= p.MaxSends:
		refuse(events.ReasonRateLimited, "max_sends", "this challenge reached its send cap; start a new request", 0)
		return nil
	case c != nil && now.Sub(c.lastCodeAt) < p.ResendCooldown:
		refuse(events.ReasonRateLimited, "resend_cooldown", "resend cooldown", p.ResendCooldown-now.Sub(c.lastCodeAt))
		return nil
	}
	// A request that waited longer than its code would live (the stream's clock against
	// the database's) gets no code: its user has given up, and a code arriving now would
	// only confuse. A duplicate above was answered before and is not refused again.
	if waited := now.Sub(r.stored); !r.stored.IsZero() && waited > ttl {
		refuse(events.ReasonStale, "", fmt.Sprintf("waited %v on OTP_REQUESTS, longer than its code's lifetime of %v",
			waited.Round(time.Second), ttl), 0)
		return nil
	}
	// A request of a person erased after the stream stored it was in flight when the
	// erasure was asked: the erasure wins.
	if at, ok := st.erased[rk]; ok && !r.stored.IsZero() && !r.stored.After(at) {
		refuse(events.ReasonErased, "", "the recipient was erased after this request was made", 0)
		return nil
	}
	// A recipient whose mail bounced for good or who complained is mailed no more: a
	// new challenge and a resend alike.
	for _, sp := range st.suppressed[rk] {
		if !isTest && !p.Suppression.Disabled && sp.activeAt(now, p.Suppression.Expiry) {
			refuse(events.ReasonSuppressed, sp.reason, "the recipient is on the suppression list ("+sp.reason+"); ask for another address", 0)
			return nil
		}
	}
	if c != nil {
		// A resend goes to the address the challenge was created with, stored sealed.
		if err := s.openRecipient(c); err != nil {
			refuse(events.ReasonChallengeClosed, "", "this challenge's recipient cannot be read back (seal key retired); start a new request", 0)
			return nil
		}
	}
	if ck, ok := r.clientKey(); c == nil && ok && p.Risk.IPFanout.Recipients > 0 {
		seen := st.ipSeen[ck]
		if !seen.has(r.subjects) && seen.count() >= p.Risk.IPFanout.Recipients {
			refuse(events.ReasonRisk, "ip_fanout", "this client asked codes for too many recipients", p.Risk.IPFanout.Window)
			return nil
		}
	}
	// Test recipients obey every limit: a fixed code is only as safe as the limits on
	// guessing it.
	if limit, wait := s.overLimit(st, p, r, rk, now); limit != "" {
		refuse(events.ReasonRateLimited, limit, strings.ReplaceAll(limit, "_", " ")+" limit", wait)
		return nil
	}
	s.recordSend(st, w, r, rk, now)

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

	if c.isNew && c.codeCount == 1 {
		for _, old := range st.active[rk] {
			w.add(supersession{challengeID: old.id, by: r.req.RequestID})
			sup := events.Superseded{ChallengeID: old.id, Tenant: r.tenant, RequestID: old.requestID, SupersededBy: r.req.RequestID,
				SupersededAt: now.UTC(), Test: isTest}
			// The audit's record, and the verifier's, on its own stream in the order of
			// the challenges it closes.
			m, err := events.NewMsg(events.TypeSuperseded, r.tenant, "superseded:"+old.id, old.id, sup, s.envelope(r, now))
			if err != nil {
				return err
			}
			cm, err := events.NewMsg(events.TypeChallengeSuperseded, r.tenant, "challenge_superseded:"+old.id, old.id, sup, s.envelope(r, now))
			if err != nil {
				return err
			}
			w.publish(cm, m)
		}
		st.active[rk] = []activeRef{{id: c.id, requestID: r.req.RequestID}}
	}
	return s.newCode(w, r, c, codeParams{policy: p, ttl: ttl, maxAttempts: maxAttempts, testCode: testCode, test: isTest, risk: risk}, now)
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
	if ck, ok := r.clientKey(); ok && rl.IPPerMinute > 0 {
		if ipStamps := st.logs[ipRate(r.tenant, ck.ip)].Trim(now.Add(-time.Minute)); len(ipStamps) >= rl.IPPerMinute {
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
func (s *Service) recordSend(st *batchState, w *writes, r *request, rk rcptKey, now time.Time) {
	st.logs[rk.rate()] = st.logs[rk.rate()].Trim(now.Add(-time.Hour)).Add(now)
	w.logs[rk.rate()] = true
	if ck, ok := r.clientKey(); ok {
		ik := ipRate(r.tenant, ck.ip)
		st.logs[ik] = st.logs[ik].Trim(now.Add(-time.Hour)).Add(now)
		w.logs[ik] = true
		if st.ipSeen[ck] == nil {
			st.ipSeen[ck] = seenSet{}
		}
		// One row per key, client and recipient hashed under the same key.
		for i, h := range r.subjects {
			st.ipSeen[ck].add(h)
			w.clients = append(w.clients, ipRecipient{tenant: r.tenant, ipHash: r.clients[i], recipientHash: h})
		}
	}
	win := st.windows[tenantRate(r.tenant)]
	if now.Sub(win.start) >= time.Minute {
		win.start, win.count = now, 0
	}
	win.count++
	w.windows[tenantRate(r.tenant)] = true
}

type codeParams struct {
	policy      policy.Policy
	ttl         time.Duration
	maxAttempts int
	testCode    string
	test        bool
	risk        []string
}

// newCode draws code number c.codeCount of challenge c, records its rows, and publishes
// the issued event (HMAC only) and, unless the recipient is a test recipient, the
// dispatch job (sealed code).
func (s *Service) newCode(w *writes, r *request, c *challenge, cp codeParams, now time.Time) error {
	expires := now.Add(cp.ttl)
	code := cp.testCode
	if !cp.test {
		var err error
		if code, err = newCode(cp.policy.CodeLength, cp.policy.Alphabet); err != nil {
			return fmt.Errorf("draw code: %w", err)
		}
	}
	pepperID := s.cfg.Pepper.ActiveID()
	mac, err := s.cfg.Pepper.MAC(pepperID, c.id, code)
	if err != nil {
		return err
	}
	if c.isNew && c.codeCount == 1 {
		sealKeyID, sealed, err := s.cfg.Sealer.Seal(recipientAD(c.id), []byte(c.address))
		if err != nil {
			return fmt.Errorf("seal recipient: %w", err)
		}
		w.add(newChallenge{tenant: r.tenant, requestID: r.req.RequestID, id: c.id, sealKeyID: sealKeyID, sealed: sealed,
			recipient: c.recipient, purpose: r.req.Purpose, locale: r.req.Locale, sessionID: r.req.Context.SessionID,
			codeCount: c.codeCount, createdAt: now, expiresAt: expires, test: cp.test})
	} else {
		w.add(nextCode{id: c.id, codeCount: c.codeCount, issuedAt: now, expiresAt: expires})
	}
	w.add(codeRow{challengeID: c.id, seq: c.codeCount, hmac: mac, pepperID: pepperID, issuedAt: now, expiresAt: expires})

	locale := r.req.Locale
	if locale == "" {
		locale = cp.policy.Locale
	}
	env := s.envelope(r, now)
	// What the verifier needs, on its own short-lived stream; what the audit keeps, with
	// no code HMAC, no session and the person and client only as hashes.
	chal := events.Challenge{
		ChallengeID: c.id, Tenant: r.tenant, RequestID: r.req.RequestID, CodeSeq: c.codeCount,
		CodeLength: cp.policy.CodeLength, CodeHMAC: mac, PepperKeyID: pepperID, MaxAttempts: cp.maxAttempts,
		SessionID: r.req.Context.SessionID, RecipientHashes: r.subjects, Resend: c.codeCount > 1,
		IssuedAt: now.UTC(), ExpiresAt: expires.UTC(), Test: cp.test, Risk: cp.risk,
	}
	cm, err := events.NewMsg(events.TypeChallenge, r.tenant, fmt.Sprintf("challenge:%s:%d", c.id, c.codeCount), c.id, chal, env)
	if err != nil {
		return err
	}
	issued := events.Issued{
		ChallengeID: c.id, Tenant: r.tenant, RequestID: r.req.RequestID, CodeSeq: c.codeCount,
		RecipientHash: r.subjects[0], RecipientMasked: events.MaskAddress(c.address), Purpose: r.req.Purpose, Locale: locale,
		CodeLength: cp.policy.CodeLength, MaxAttempts: cp.maxAttempts, Resend: c.codeCount > 1,
		IssuedAt: now.UTC(), ExpiresAt: expires.UTC(), RequestedAt: r.stored, Test: cp.test, Risk: cp.risk,
	}
	if ck, ok := r.clientKey(); ok {
		issued.ClientHash = ck.ip
	}
	im, err := events.NewMsg(events.TypeIssued, r.tenant, fmt.Sprintf("issued:%s:%d", c.id, c.codeCount), c.id, issued, env)
	if err != nil {
		return err
	}
	if cp.test {
		w.publish(cm, im) // a test recipient is never mailed
		return nil
	}
	// The whole job is sealed: whoever can read or write OTP_DISPATCH can neither learn
	// the code or the address nor redirect, renumber or re-time the mail.
	job, err := s.cfg.Sealer.SealJob(events.DispatchJob{
		ChallengeID: c.id, Tenant: r.tenant, RequestID: r.req.RequestID, CodeSeq: c.codeCount,
		Recipient: c.address, Purpose: r.req.Purpose, Locale: locale,
		IssuedAt: now.UTC(), ExpiresAt: expires.UTC(), Code: code,
	})
	if err != nil {
		return fmt.Errorf("seal dispatch job: %w", err)
	}
	jm, err := events.NewMsg(events.TypeDispatch, r.tenant, fmt.Sprintf("dispatch:%s:%d", c.id, c.codeCount), c.id, job, env)
	if err != nil {
		return err
	}
	// The challenge goes first: the verifier should know it before the user can read
	// the mail.
	w.publish(cm, im, jm)
	return nil
}
