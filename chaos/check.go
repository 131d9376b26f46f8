package chaos

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
)

// check holds what one scenario left behind and checks the promises against it.
type check struct {
	sc     Scenario
	e      *Env
	ledger *Ledger
	load   *Load
	prober *Prober
	reqs   []Request
	t      *testing.T

	loadStart, faultAt, healedAt time.Time

	row        Row
	mails      map[string][]Mail // by challenge id
	auditTimes map[uint64]auditRow
}

func (c *check) violate(format string, args ...any) {
	c.row.Violations = append(c.row.Violations, fmt.Sprintf(format, args...))
}

func (c *check) note(format string, args ...any) {
	c.row.Notes = append(c.row.Notes, fmt.Sprintf(format, args...))
}

func (c *check) run(nc *nats.Conn) Row {
	c.row = Row{Scenario: c.sc.Name}
	c.checkRequests()
	c.checkMails()
	c.checkVerify(nc)
	c.checkAudit()
	c.measure()
	return c.row
}

// checkRequests: every accepted request has one outcome of the right kind, each code one
// terminal event, each refused request one rejection, each supersession one event.
func (c *check) checkRequests() {
	l := c.ledger
	l.mu.Lock()
	defer l.mu.Unlock()
	var noOutcome, refusedValid, notAcked []string
	refusedReasons := map[string]int{}
	swapped := 0
	pairs := map[string]string{} // target request id -> supersede request id
	for _, r := range c.reqs {
		if r.Acked && r.Kind == Supersede {
			pairs[r.Of] = r.ID
		}
	}
	for _, r := range c.reqs {
		if !r.Acked {
			notAcked = append(notAcked, r.ID)
			continue
		}
		c.row.Requests++
		if r.Kind == Repeat {
			if n := len(l.byRequest[r.Of]); n > 1 {
				c.violate("app retry %s of %s: %d codes issued for one request id", r.ID, r.Of, n)
			}
			continue
		}
		rej, codes := l.rejected[r.Seq], l.byRequest[r.ID]
		switch {
		case len(rej) > 1:
			c.violate("request %s has %d rejected events", r.ID, len(rej))
		case len(rej) == 1 && len(codes) > 0:
			c.violate("request %s was both refused and issued", r.ID)
		case len(rej) == 0 && len(codes) == 0:
			noOutcome = append(noOutcome, r.ID)
		}
		if r.Kind == Invalid && len(codes) > 0 {
			c.violate("invalid request %s was issued a code", r.ID)
		}
		if (r.Kind == Normal || r.Kind == Target || r.Kind == Test) && len(rej) > 0 {
			if r.Kind == Target && len(l.byRequest[pairs[r.ID]]) > 0 && rej[0].Reason == string(events.ReasonRateLimited) {
				// The app's retries put the later request for this address on the stream
				// first; this one then came within the recipient cooldown.
				swapped++
				continue
			}
			refusedValid = append(refusedValid, r.ID)
			refusedReasons[rej[0].Reason]++
		}
	}
	if swapped > 0 {
		c.note("%d requests reached the stream after the later request for their address (the app retried them) and were refused within the recipient cooldown", swapped)
	}
	if len(notAcked) > 0 {
		c.note("%d requests never acknowledged by JetStream within %v of retries (not counted)", len(notAcked), c.load.PublishFor)
	}
	if len(noOutcome) > 0 {
		c.row.Lost += len(noOutcome)
		c.violate("%d accepted requests neither issued nor refused (e.g. %s)", len(noOutcome), first(noOutcome))
	}
	if len(refusedValid) > 0 {
		c.violate("%d valid requests refused (%v; e.g. %s)", len(refusedValid), refusedReasons, first(refusedValid))
	}

	var noTerminal, manyTerminal, testTerminal []string
	for code, is := range l.issued {
		n := len(l.terminal[code])
		switch {
		case is.Test && n > 0:
			testTerminal = append(testTerminal, is.RequestID)
		case is.Test:
		case n == 0:
			noTerminal = append(noTerminal, is.RequestID)
		case n > 1:
			manyTerminal = append(manyTerminal, fmt.Sprintf("%s (%d)", is.RequestID, n))
		}
	}
	for code := range l.terminal {
		if _, ok := l.issued[code]; !ok {
			c.violate("a terminal event for code %s:%d that was never issued", code.ChallengeID, code.Seq)
		}
	}
	if len(noTerminal) > 0 {
		c.row.Lost += len(noTerminal)
		c.violate("%d issued codes without a terminal event (e.g. %s)", len(noTerminal), first(noTerminal))
	}
	if len(manyTerminal) > 0 {
		c.violate("%d codes with more than one terminal event (e.g. %s)", len(manyTerminal), first(manyTerminal))
	}
	if len(testTerminal) > 0 {
		c.violate("%d test-recipient codes got a terminal event (they are never mailed)", len(testTerminal))
	}
	for ch, n := range l.verified {
		if n > 1 {
			c.violate("challenge %s has %d otp.verified events", ch, n)
		}
	}

	// A pair of requests for one address: when both were issued, exactly one of the two
	// challenges is superseded, once (the one issued first; the stream may store them in
	// either order when the app retried); when one was refused, neither.
	expected := map[string]bool{}
	for target, sup := range pairs {
		a, b := l.byRequest[target], l.byRequest[sup]
		n := 0
		for _, codes := range [][]Code{a, b} {
			for _, cd := range codes {
				n += len(l.superseded[cd.ChallengeID])
				expected[cd.ChallengeID] = true
			}
		}
		want := 0
		if len(a) > 0 && len(b) > 0 {
			want = 1
		}
		if n != want {
			c.violate("requests %s and %s for one address: %d superseded events, want %d", target, sup, n, want)
		}
	}
	for ch, evs := range l.superseded {
		if !expected[ch] {
			c.violate("challenge %s (request %s) superseded, though no later request asked for its address", ch, evs[0].RequestID)
		}
	}
}

// checkMails: each code reported delivered reached a sink, none that ended otherwise
// did, and a code mailed more than once is within what the design allows.
func (c *check) checkMails() {
	c.mails = map[string][]Mail{}
	// The sinks may still be taking the last mails in when the events are read.
	deadline := time.Now().Add(15 * time.Second)
	for {
		c.mails = map[string][]Mail{}
		for _, m := range c.e.Mails() {
			c.mails[m.ChallengeID] = append(c.mails[m.ChallengeID], m)
		}
		if c.missingMails() == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	ambiguous, err := c.ambiguousSends()
	if err != nil {
		c.violate("reading the dispatcher's ambiguous sends: %v", err)
	}

	l := c.ledger
	l.mu.Lock()
	defer l.mu.Unlock()
	byChallenge := map[string]Event{}
	for code, is := range l.issued {
		byChallenge[code.ChallengeID] = is
	}
	var unmailed, phantom, mixed, undelivered []string
	failed, expired := 0, 0
	extras := 0
	var resends []string
	for code, is := range l.issued {
		if is.Test {
			if n := len(c.mails[code.ChallengeID]); n > 0 {
				c.violate("test recipient of %s got %d mails", is.RequestID, n)
			}
			continue
		}
		t := l.terminal[code]
		if len(t) == 0 {
			continue // counted lost already
		}
		ms := c.mails[code.ChallengeID]
		switch t[0].Type {
		case events.TypeDelivered:
			if len(ms) == 0 && !t[0].Unconfirmed {
				unmailed = append(unmailed, is.RequestID)
			}
		case events.TypeDeliveryFailed:
			failed++
			if len(ms) > 0 {
				undelivered = append(undelivered, is.RequestID)
			}
		case events.TypeDispatchExpired:
			expired++
			if len(ms) > 0 {
				undelivered = append(undelivered, is.RequestID)
			}
		}
		for _, m := range ms[min(1, len(ms)):] {
			if m.Code != ms[0].Code {
				mixed = append(mixed, is.RequestID)
				break
			}
		}
		if len(ms) <= 1 {
			continue
		}
		extra := len(ms) - 1
		if ambiguous[code.ChallengeID] {
			resends = append(resends, is.RequestID)
			c.row.InFlight++ // the one deliberate re-send after an ambiguous answer
			extra--
		}
		extras += extra
	}
	for ch, ms := range c.mails {
		if _, ok := byChallenge[ch]; !ok {
			phantom = append(phantom, fmt.Sprintf("%s to %s", ch, ms[0].To))
		}
	}
	// What remains may be the sends a killed dispatcher had in flight, up to its bound.
	if c.sc.InFlight != nil {
		bound := c.sc.InFlight(c.e)
		allowed := min(extras, bound)
		c.row.InFlight += allowed
		extras -= allowed
		c.note("%d sends in flight at the kill (claimed, never recorded); %d codes mailed again after it", bound, allowed)
	}
	c.row.Duplicates = extras
	if extras > 0 {
		c.violate("%d mails beyond one per code that no rule allows", extras)
	}
	if len(unmailed) > 0 {
		c.row.Lost += len(unmailed)
		c.violate("%d codes reported delivered that no sink received (e.g. %s)", len(unmailed), first(unmailed))
	}
	if failed+expired > 0 {
		c.row.Lost += failed + expired
		c.violate("%d codes never mailed: %d delivery_failed, %d dispatch_expired (every fault here is shorter than a code's lifetime)", failed+expired, failed, expired)
	}
	if len(undelivered) > 0 {
		c.note("%d codes reported failed or expired were mailed anyway (e.g. %s)", len(undelivered), first(undelivered))
	}
	if len(mixed) > 0 {
		c.violate("%d codes mailed twice with different codes (e.g. %s)", len(mixed), first(mixed))
	}
	if len(phantom) > 0 {
		c.violate("%d mails for challenges never issued (e.g. %s)", len(phantom), first(phantom))
	}
	bySink := map[string]int{}
	for _, ms := range c.mails {
		for _, m := range ms {
			bySink[m.Sink]++
		}
	}
	c.note("mails: %d via SES, %d via SMTP", bySink["ses"], bySink["smtp"])
	if len(resends) > 0 {
		c.note("%d deliberate re-sends after an ambiguous answer (e.g. %s)", len(resends), first(resends))
	}
}

// missingMails is how many codes reported delivered (and confirmed) no sink received yet.
func (c *check) missingMails() int {
	l := c.ledger
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for code, t := range l.terminal {
		if len(t) > 0 && t[0].Type == events.TypeDelivered && !t[0].Unconfirmed && len(c.mails[code.ChallengeID]) == 0 {
			n++
		}
	}
	return n
}

// ambiguousSends are the challenges with a send whose outcome the provider never
// confirmed, read from the dispatcher's own table: the one case in which the design
// mails a code a second time on purpose.
func (c *check) ambiguousSends() (map[string]bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rows, err := c.e.Pool().Query(ctx, `SELECT challenge_id::text FROM dispatcher.deliveries WHERE ambiguous > 0`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]bool{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		out[id] = true
	}
	return out, rows.Err()
}

// checkVerify: the codes the users typed in verified; and a sample of codes, each sent
// twice at once, verifies exactly once.
func (c *check) checkVerify(nc *nats.Conn) {
	probes := c.prober.Probes()
	var bad []string
	lostReplies, notFound, retried := 0, 0, 0
	var worst time.Duration
	for _, p := range probes {
		if p.ServiceErrors > 0 {
			retried++
		}
		if p.NotFound > 0 {
			notFound++
			worst = max(worst, p.Done.Sub(p.At))
		}
		switch {
		case p.Err == nil && p.Status == events.StatusVerified:
		case p.Err == nil && p.Status == events.StatusAlreadyUsed && p.Unanswered:
			// An earlier try went unanswered (the verifier died after using the code): the
			// app's retry learns it was used. The stream shows the one otp.verified.
			lostReplies++
		default:
			bad = append(bad, fmt.Sprintf("%s: %s %v", p.RequestID, p.Status, p.Err))
		}
	}
	if notFound > 0 {
		c.note("%d mailed codes were not_found at first: the verifier had not projected their challenge yet (for up to %s)", notFound, dur(worst))
	}
	if retried > 0 {
		c.note("%d verifications answered \"500 internal error; retry\" at first, then verified on the app's retry", retried)
	}
	if lostReplies > 0 {
		c.note("%d verifications answered already_used to the app's retry: the first try used the code and its reply was lost with the process", lostReplies)
	}
	if len(bad) > 0 {
		c.violate("%d of %d mailed codes did not verify (e.g. %s)", len(bad), len(probes), first(bad))
	}
	if len(probes) == 0 {
		c.violate("no mailed code was verified while the load ran")
	}

	// The sample: Normal requests' codes the prober left, spread over the run.
	var cands []Mail
	seen := map[string]bool{}
	for _, ms := range c.mails {
		id, ok := requestOf(ms[0].To)
		if !ok || seen[id] || c.load.kind(id) != Normal || c.prober.Used(id) || ms[0].Code == "" {
			continue
		}
		seen[id] = true
		cands = append(cands, ms[0])
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].To < cands[j].To })
	const sampleSize = 20
	step := max(1, len(cands)/sampleSize)
	twice := 0
	verified := 0
	for i := 0; i < len(cands) && verified < sampleSize; i += step {
		m := cands[i]
		id, _ := requestOf(m.To)
		var wg sync.WaitGroup
		var got [2]events.VerifyStatus
		var errs [2]error
		for k := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got[k], _, errs[k] = Verify(nc, id, m.Code, 30*time.Second)
			}()
		}
		wg.Wait()
		verified++
		ok := 0
		for k := range 2 {
			if errs[k] != nil {
				c.violate("verify %s: %v", id, errs[k])
			}
			if got[k] == events.StatusVerified {
				ok++
			}
		}
		switch {
		case ok > 1:
			twice++
		case ok == 0:
			c.violate("verify %s twice at once: %v, none verified", id, got)
		}
		if s, _, err := Verify(nc, id, m.Code, 30*time.Second); err == nil && s == events.StatusVerified {
			twice++
		}
	}
	if twice > 0 {
		c.violate("%d codes verified twice", twice)
	}
	if verified == 0 {
		c.violate("no code left to verify twice")
	}
	c.note("%d codes verified by the users while the load ran; %d more each verified twice at once and once again after", len(probes), verified)
}

// checkAudit: every OTP_EVENTS message is in the auditor's table, under its sequence
// and with its id, and the table holds nothing else.
func (c *check) checkAudit() {
	deadline := time.Now().Add(90 * time.Second)
	var missing, wrong, extra int
	var example string
	for {
		if err := c.ledger.Poll(); err != nil {
			c.t.Logf("reading OTP_EVENTS: %v", err)
		}
		evs := c.ledger.Events()
		rows, err := c.auditRows()
		if err != nil {
			c.t.Logf("reading audit.events: %v", err)
		}
		missing, wrong, extra, example = 0, 0, 0, ""
		inStream := map[uint64]bool{}
		for _, e := range evs {
			inStream[e.Seq] = true
			r, ok := rows[e.Seq]
			switch {
			case !ok:
				missing++
				if example == "" {
					example = fmt.Sprintf("%d %s %s", e.Seq, e.Type, e.ID)
				}
			case r.id != e.ID:
				wrong++
			}
		}
		for seq := range rows {
			if !inStream[seq] {
				extra++
			}
		}
		if missing+wrong+extra == 0 || time.Now().After(deadline) {
			c.auditTimes = rows
			break
		}
		time.Sleep(time.Second)
	}
	if missing > 0 {
		c.violate("%d OTP_EVENTS messages not in the audit log 90s after the load (e.g. %s)", missing, example)
	}
	if wrong > 0 {
		c.violate("%d audit rows carry another event id than the stream", wrong)
	}
	if extra > 0 {
		c.violate("%d audit rows for stream sequences the stream does not hold", extra)
	}
}

type auditRow struct {
	id       string
	recorded time.Time
}

func (c *check) auditRows() (map[uint64]auditRow, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rows, err := c.e.Pool().Query(ctx, `SELECT stream_seq, event_id, recorded_at FROM audit.events`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[uint64]auditRow{}
	for rows.Next() {
		var seq int64
		var r auditRow
		if err := rows.Scan(&seq, &r.id, &r.recorded); err != nil {
			return nil, err
		}
		out[uint64(seq)] = r
	}
	return out, rows.Err()
}

// measure: time to recover over the three flows: requests to their outcome, codes to
// their verification, events to their audit row.
func (c *check) measure() {
	var reqs, verifies, audits []sample
	for _, r := range c.reqs {
		if !r.Acked || r.Kind == Repeat {
			continue
		}
		s := sample{what: "request " + r.ID, start: r.At}
		if o, ok := c.ledger.Outcome(r); ok {
			s.end, s.done = o.At, true
		}
		reqs = append(reqs, s)
	}
	for _, p := range c.prober.Probes() {
		verifies = append(verifies, sample{what: "verify " + p.RequestID, start: p.At, end: p.Done, done: p.Err == nil})
	}
	for _, e := range c.ledger.Events() {
		if e.At.After(c.healedAt.Add(c.sc.Post)) {
			continue // the suite's own verifications after the load
		}
		s := sample{what: fmt.Sprintf("event %d %s", e.Seq, e.Type), start: e.At}
		if r, ok := c.auditTimes[e.Seq]; ok {
			s.end, s.done = r.recorded, true
		}
		audits = append(audits, s)
	}
	c.row.Recover, c.row.Settled = 0, 0
	var parts []string
	for _, f := range []struct {
		name    string
		samples []sample
	}{{"requests", reqs}, {"verify", verifies}, {"audit", audits}} {
		if len(f.samples) == 0 {
			continue
		}
		rec, set, bound, ok := recovery(f.samples, c.loadStart, c.faultAt)
		if !ok {
			c.row.Recover, c.row.Settled = -1, -1
			c.violate("the %s flow had not recovered when the run ended", f.name)
			parts = append(parts, f.name+": not recovered")
			continue
		}
		if c.row.Recover >= 0 {
			c.row.Recover, c.row.Settled = max(c.row.Recover, rec), max(c.row.Settled, set)
		}
		parts = append(parts, fmt.Sprintf("%s %s/%s (slow: over %s; slowest: %s)", f.name, dur(rec), dur(set), dur(bound), slowest(f.samples)))
	}
	c.note("recover/settled per flow: %s", strings.Join(parts, "; "))
}

func dur(d time.Duration) string {
	if d < 0 {
		return "—"
	}
	return d.Round(100 * time.Millisecond).String()
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

// slowest names the longest finished trip of samples.
func slowest(samples []sample) string {
	var worst sample
	for _, s := range samples {
		if s.done && s.end.Sub(s.start) > worst.end.Sub(worst.start) {
			worst = s
		}
	}
	return fmt.Sprintf("%s in %s", worst.what, dur(worst.end.Sub(worst.start)))
}
