package auditor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/prometheus/client_golang/prometheus"
)

// Alert rule names.
const (
	RuleVerifyFailuresRecipient = "verify_failures_recipient" // failed verifications for one recipient
	RuleVerifyFailuresTenant    = "verify_failures_tenant"    // failed verifications in one tenant
	RuleDeliveryFailureRatio    = "delivery_failure_ratio"    // share of failed calls to one provider
	RuleRequestBurstIP          = "request_burst_ip"          // codes issued for one client IP
	RuleSupersedeStorm          = "supersede_storm"           // superseded challenges in one tenant
	RuleBounceRate              = "bounce_rate"               // share of one tenant's mails that bounced for good
	RuleComplaintRate           = "complaint_rate"            // share of one tenant's mails marked as spam
)

// Threshold is one alert rule: Count events within Window (for a ratio rule: a share of
// at least Ratio among at least Count calls or mails sent).
type Threshold struct {
	Count  int
	Window time.Duration
	Ratio  float64
}

// DefaultThresholds are the rules' defaults.
func DefaultThresholds() map[string]Threshold {
	return map[string]Threshold{
		RuleVerifyFailuresRecipient: {Count: 8, Window: 10 * time.Minute},
		RuleVerifyFailuresTenant:    {Count: 200, Window: time.Minute},
		RuleDeliveryFailureRatio:    {Count: 20, Window: 5 * time.Minute, Ratio: 0.5},
		RuleRequestBurstIP:          {Count: 30, Window: time.Minute},
		RuleSupersedeStorm:          {Count: 100, Window: time.Minute},
		// The sender's reputation, well below where SES suspends an account (about 10 %
		// bounces, 0.5 % complaints) and at the rates where it puts one under review. A
		// rate is judged once the tenant sent Count mails through the provider within the
		// hour: 5 bounces among 100, or one complaint among 1,000 (below that, one
		// complaint alone is over 0.1 %: the rule would say "any complaint").
		RuleBounceRate:    {Count: 100, Window: time.Hour, Ratio: 0.05},
		RuleComplaintRate: {Count: 1000, Window: time.Hour, Ratio: 0.001},
	}
}

// ParseThresholds reads OTP_ALERT_RULES: "rule=count/window[/ratio],...", overriding the
// defaults; a count of 0 turns a rule off, and a ratio rule given without a ratio keeps
// its default one.
func ParseThresholds(s string) (map[string]Threshold, error) {
	th := DefaultThresholds()
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, spec, ok := strings.Cut(part, "=")
		if _, known := th[name]; !ok || !known {
			return nil, fmt.Errorf("alert rule %q: want one of %s as rule=count/window", name, strings.Join(ruleNames(th), ", "))
		}
		fields := strings.Split(spec, "/")
		if len(fields) < 2 || len(fields) > 3 {
			return nil, fmt.Errorf("alert rule %s: want count/window[/ratio]", name)
		}
		var t Threshold
		var err error
		if t.Count, err = strconv.Atoi(fields[0]); err != nil || t.Count < 0 {
			return nil, fmt.Errorf("alert rule %s: bad count", name)
		}
		if t.Window, err = time.ParseDuration(fields[1]); err != nil || t.Window <= 0 {
			return nil, fmt.Errorf("alert rule %s: bad window", name)
		}
		if len(fields) == 3 {
			if t.Ratio, err = strconv.ParseFloat(fields[2], 64); err != nil || t.Ratio <= 0 || t.Ratio > 1 {
				return nil, fmt.Errorf("alert rule %s: bad ratio", name)
			}
		} else {
			t.Ratio = DefaultThresholds()[name].Ratio // a ratio rule keeps its default share
		}
		th[name] = t
	}
	return th, nil
}

func ruleNames(th map[string]Threshold) []string {
	var out []string
	for k := range th {
		out = append(out, k)
	}
	return out
}

// alerter watches the audited events for anomalies and raises otp.alert.<tenant>. An
// alert lands on the audit stream, which erasure cannot reach: its detail names no
// address and no IP, not even masked, and its id no unkeyed hash of one; the person or
// client network it counted is named only by subject hash (Alert.SubjectHash).
//
// Its windows are not in memory: every batch adds its events to them in the database, in
// the transaction that writes the batch and while it holds the chain head (evaluate), so
// an auditor that restarts counts on where the last one stopped, and auditors sharing the
// consumer take turns on one count and one record of the alerts raised.
type alerter struct {
	th     map[string]Threshold
	raised *prometheus.CounterVec
	// keep is how long the alerts raised outlive the newest event: twice the longest
	// window. A rule's stamps are kept twice its own window (prune), so that events
	// written a little out of time order (by several auditors) still find their window.
	keep time.Duration

	mu        sync.Mutex
	lastPrune time.Time
}

// pruneEvery is how often one auditor prunes the alert state.
const pruneEvery = time.Minute

func newAlerter(th map[string]Threshold, reg prometheus.Registerer) *alerter {
	a := &alerter{th: th, raised: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "otpflow_auditor_alerts_total", Help: "Anomaly alerts raised, by rule.",
	}, []string{"rule"})}
	for _, t := range th {
		if t.Count > 0 {
			a.keep = max(a.keep, 2*t.Window)
		}
	}
	if reg != nil {
		reg.MustRegister(a.raised)
	}
	return a
}

// signal is what one event adds to one rule's window.
type signal struct {
	rule string
	key  string // the window: tenant|subject hash, tenant, or provider
	// digest is the SHA-256 of key: the window as the database knows it, and (its first
	// 8 bytes) in the alert's id.
	digest  []byte
	tenant  string // of the alert
	subject string // the alert's subject hash, if it counts one person or network
	// provider is the mail provider a ratio rule counts the calls or mails of.
	provider string
	seq      uint64
	at       time.Time
	// n events (for the ratio rules: calls, or mails sent), failed of them.
	n, failed int
}

// challengeRef is a challenge of a tenant.
type challengeRef struct{ tenant, id string }

// signals lists what rows add to the rules' windows, in row order. recipients are the
// recipient hashes of the challenges the rows' failed verifications name.
func (a *alerter) signals(rows []*Row, recipients map[challengeRef]string) []signal {
	var out []signal
	push := func(r *Row, s signal) {
		if a.th[s.rule].Count == 0 {
			return // the rule is off
		}
		sum := sha256.Sum256([]byte(s.key))
		s.digest, s.seq, s.at = sum[:], r.StreamSeq, r.OccurredAt
		out = append(out, s)
	}
	// add counts one event in a counting rule's window.
	add := func(r *Row, rule, key, tenant, subject string) {
		push(r, signal{rule: rule, key: key, tenant: tenant, subject: subject, n: 1})
	}
	// ratio adds to a ratio rule's window: n calls or mails of provider, failed of them.
	ratio := func(r *Row, rule, key, tenant, provider string, n, failed int) {
		push(r, signal{rule: rule, key: key, tenant: tenant, provider: provider, n: n, failed: failed})
	}
	for _, r := range rows {
		switch e := r.Event.(type) {
		case events.Issued:
			if client := r.PII["client_hash"]; client != "" {
				// Counted per client network, as the issuer's limits count, by its subject
				// hash (events.ClientNetwork under OTP_SUBJECT_KEY; ToRow hashes the IP of an
				// event of an earlier release): the window's key ends up hashed in the alert's
				// id, and an unkeyed hash of an IPv4 address is undone by trying them all.
				add(r, RuleRequestBurstIP, r.Tenant+"|"+client, r.Tenant, client)
			}
		case events.VerifyFailed:
			add(r, RuleVerifyFailuresTenant, r.Tenant, r.Tenant, "")
			// The recipient is the one of the challenge's otp.issued row: its subject hash.
			if who := recipients[challengeRef{r.Tenant, e.ChallengeID}]; who != "" {
				add(r, RuleVerifyFailuresRecipient, r.Tenant+"|"+who, r.Tenant, who)
			}
		case events.Superseded:
			add(r, RuleSupersedeStorm, r.Tenant, r.Tenant, "")
		case events.Delivered:
			for _, c := range providerCalls(e.ProviderAttempts) {
				ratio(r, RuleDeliveryFailureRatio, c.provider, "_system", c.provider, c.n, c.failed)
			}
			// A mail sent: what the tenant's bounces and complaints through this provider
			// are a share of. Only through a provider that reports them: the relays and
			// the null sink never will, and a stamp per mail of theirs would only be kept.
			if reportsFeedback[e.Provider] {
				ratio(r, RuleBounceRate, r.Tenant+"|"+e.Provider, r.Tenant, e.Provider, 1, 0)
				ratio(r, RuleComplaintRate, r.Tenant+"|"+e.Provider, r.Tenant, e.Provider, 1, 0)
			}
		case events.DeliveryFailed:
			for _, c := range providerCalls(e.ProviderAttempts) {
				ratio(r, RuleDeliveryFailureRatio, c.provider, "_system", c.provider, c.n, c.failed)
			}
		case events.Feedback:
			if rule := reputationRule(e); rule != "" && e.Provider != "" {
				ratio(r, rule, r.Tenant+"|"+e.Provider, r.Tenant, e.Provider, 0, 1)
			}
		}
	}
	return out
}

// reportsFeedback are the providers whose mails get otp.feedback (SES, through its event
// notifications): the only ones the reputation rules count mails of.
var reportsFeedback = map[string]bool{"ses": true}

// reputationRule is the rule a feedback counts against, if any. A bounce counts when it
// is permanent, as SES counts hard bounces in an account's bounce rate: a transient one
// (a full mailbox, a server that answered "later") and an undetermined one count toward
// nothing, nor does a permanent one SES reports for an address on the account's own
// suppression list (it never sent that mail, and leaves it out of its rate). A complaint
// always counts.
func reputationRule(f events.Feedback) string {
	switch {
	case f.Kind == events.FeedbackBounced && strings.EqualFold(f.BounceType, bouncePermanent) &&
		!strings.EqualFold(f.BounceSubType, bounceOnSuppressionList):
		return RuleBounceRate
	case f.Kind == events.FeedbackComplained:
		return RuleComplaintRate
	}
	return ""
}

// SES's words for a hard bounce, and for one it reports without sending because the
// address is on the account's suppression list (events.Feedback.BounceType, BounceSubType).
const (
	bouncePermanent         = "Permanent"
	bounceOnSuppressionList = "OnAccountSuppressionList"
)

// providerCount is the calls of one delivery to one provider, and how many failed.
type providerCount struct {
	provider  string
	n, failed int
}

// providerCalls sums the calls of one delivery per provider, in the order they were made.
// A call failed unless it succeeded or the address was refused (that says nothing of the
// provider's health).
func providerCalls(attempts []events.ProviderAttempt) []providerCount {
	var out []providerCount
	at := map[string]int{}
	for _, c := range attempts {
		if c.Provider == "" {
			continue
		}
		i, ok := at[c.Provider]
		if !ok {
			i = len(out)
			at[c.Provider] = i
			out = append(out, providerCount{provider: c.Provider})
		}
		out[i].n++
		if c.Outcome != "ok" && c.Outcome != "permanent" {
			out[i].failed++
		}
	}
	return out
}

// stamp is one event's count in a window.
type stamp struct {
	at        time.Time
	n, failed int64
}

// alertWindow is one rule's window for one key as a batch sees it: the counts of the
// stamps that stay in it for the whole batch (tail), the stamps that may leave it while
// the batch's times move on (and the batch's own, as they are added), and the last alert.
type alertWindow struct {
	tailN, tailFailed int64
	stamps            []stamp
	last              time.Time
}

// count is what the window holds after cutoff.
func (w *alertWindow) count(cutoff time.Time) (n, failed int64) {
	n, failed = w.tailN, w.tailFailed
	for _, s := range w.stamps {
		if s.at.After(cutoff) {
			n, failed = n+s.n, failed+s.failed
		}
	}
	return n, failed
}

// raisedAlert is an alert a batch raised.
type raisedAlert struct {
	rule string
	msg  *nats.Msg
	// The row that records it: rule, window digest, window start, time and event.
	digest []byte
	start  time.Time
	at     time.Time
	seq    uint64
}

// evaluate adds the events of rows, just written in tx, to their windows and returns the
// alerts they raise, recorded in tx. The caller holds the chain head (Chain.AppendThen):
// the auditors of one log evaluate one batch at a time, each seeing what the ones before
// it committed, so a window counts every event once whichever auditor wrote it, and one
// alert per key and window is raised in all. An event counts in a window with the events
// written before it that are no older than the window (the batch's earlier ones
// included); the alert is raised by the event that makes the count, unless one was raised
// for the key less than a window before.
func (a *alerter) evaluate(ctx context.Context, tx pgx.Tx, rows []*Row) ([]raisedAlert, error) {
	recipients, err := recipientsOf(ctx, tx, rows)
	if err != nil {
		return nil, err
	}
	sigs := a.signals(rows, recipients)
	if len(sigs) == 0 {
		return nil, nil
	}
	wins, err := a.windows(ctx, tx, sigs)
	if err != nil {
		return nil, fmt.Errorf("alert windows: %w", err)
	}
	var raised []raisedAlert
	for i, s := range sigs {
		t := a.th[s.rule]
		w := wins[i]
		w.stamps = append(w.stamps, stamp{at: s.at, n: int64(s.n), failed: int64(s.failed)})
		n, failed := w.count(s.at.Add(-t.Window))
		value, threshold := float64(n), float64(t.Count)
		var detail string
		switch s.rule {
		case RuleDeliveryFailureRatio, RuleBounceRate, RuleComplaintRate:
			// At least Count calls or mails sent before the share is judged: so a feedback
			// that comes before any mail of the window (n is 0) raises nothing either.
			if n < int64(t.Count) {
				continue
			}
			value, threshold = float64(failed)/float64(n), t.Ratio
			if value < t.Ratio {
				continue
			}
			detail = fmt.Sprintf(ruleDetail[s.rule], s.provider, failed, n, t.Window)
		default:
			if n < int64(t.Count) {
				continue
			}
			detail = fmt.Sprintf(ruleDetail[s.rule], n, t.Window)
		}
		if !w.last.IsZero() && s.at.Sub(w.last) < t.Window {
			continue // one alert per key and window
		}
		w.last = s.at
		start := s.at.Truncate(t.Window)
		id := fmt.Sprintf("alert:%s:%s:%d", s.rule, hex.EncodeToString(s.digest[:8]), start.Unix())
		m, err := events.NewMsg(events.TypeAlert, s.tenant, id, "", events.Alert{Tenant: s.tenant, Rule: s.rule, Severity: "warning",
			Detail: detail, Value: value, Threshold: threshold, RaisedAt: s.at.UTC(), SubjectHash: s.subject}, events.Envelope{Source: "otpflow/auditor"})
		if err != nil {
			return nil, err
		}
		raised = append(raised, raisedAlert{rule: s.rule, msg: m, digest: s.digest, start: start, at: s.at, seq: s.seq})
	}
	if len(raised) == 0 {
		return nil, nil
	}
	return record(ctx, tx, raised)
}

// windows reads the windows that sigs fall in, each once, and adds sigs to the stored
// ones; it returns the window of each signal, in order. A window holds the stamps that
// may leave it while the batch's times move on (after the earliest signal's cutoff, up to
// the latest's) one by one, the newer ones as a sum, and the time of its last alert. The
// sum reads the stamps of the second the latest cutoff falls in and, after it, the
// per-second sums of audit.alert_buckets: a handful of rows per window second, however
// many events the window holds.
func (a *alerter) windows(ctx context.Context, tx pgx.Tx, sigs []signal) ([]*alertWindow, error) {
	type wkey struct{ rule, digest string }
	idx := map[wkey]int{}
	var wins []*alertWindow // in the order of the query's arguments
	var rules []string
	var digests [][]byte
	var from, to []time.Time
	of := make([]*alertWindow, len(sigs))
	var add struct {
		rules   []string
		digests [][]byte
		at      []time.Time
		seqs    []int64
		n, f    []int32
	}
	for i, s := range sigs {
		cutoff := s.at.Add(-a.th[s.rule].Window)
		k := wkey{s.rule, string(s.digest)}
		j, ok := idx[k]
		if !ok {
			j = len(wins)
			idx[k] = j
			wins = append(wins, &alertWindow{})
			rules, digests = append(rules, s.rule), append(digests, s.digest)
			from, to = append(from, cutoff), append(to, cutoff)
		}
		of[i] = wins[j]
		from[j], to[j] = minTime(from[j], cutoff), maxTime(to[j], cutoff)
		add.rules, add.digests = append(add.rules, s.rule), append(add.digests, s.digest)
		add.at, add.seqs = append(add.at, s.at), append(add.seqs, int64(s.seq))
		add.n, add.f = append(add.n, int32(s.n)), append(add.f, int32(s.failed))
	}
	b := &pgx.Batch{}
	b.Queue(windowsSQL, rules, digests, from, to).Query(func(rows pgx.Rows) error {
		var i, n, failed int64
		var at *time.Time
		_, err := pgx.ForEachRow(rows, []any{&i, &at, &n, &failed}, func() error {
			w := wins[i-1]
			if at == nil {
				w.tailN, w.tailFailed = n, failed
			} else {
				w.stamps = append(w.stamps, stamp{at: *at, n: n, failed: failed})
			}
			return nil
		})
		return err
	})
	b.Queue(`SELECT q.i, max(r.raised_at) FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS q(rule, key, i)
		JOIN audit.alerts_raised r ON r.rule = q.rule AND r.key = q.key GROUP BY q.i`, rules, digests).Query(func(rows pgx.Rows) error {
		var i int64
		var last time.Time
		_, err := pgx.ForEachRow(rows, []any{&i, &last}, func() error {
			wins[i-1].last = last
			return nil
		})
		return err
	})
	b.Queue(`INSERT INTO audit.alert_stamps (rule, key, at, stream_seq, n, failed)
		SELECT * FROM unnest($1::text[], $2::bytea[], $3::timestamptz[], $4::bigint[], $5::int[], $6::int[])
		ON CONFLICT DO NOTHING`, add.rules, add.digests, add.at, add.seqs, add.n, add.f)
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return nil, err
	}
	return of, nil
}

// windowsSQL reads windows: for each (rule, key, from, to), the stamps in (from, to] one by
// one, then one row (at NULL) with the sums after to: the stamps up to the end of to's
// second, and the per-second sums after it. Each part is a LATERAL subquery, so it is a
// range scan of an index per window whatever plan PostgreSQL caches for the prepared
// statement (OFFSET 0 keeps the first from being flattened into a join): a join of the arguments with the tables was cached as a generic
// plan that hashed the whole of audit.alert_stamps (a stamp per provider call in the
// last window) on every batch (TestAlertWindowsUseTheKey).
const windowsSQL = `WITH q AS (SELECT * FROM unnest($1::text[], $2::bytea[], $3::timestamptz[], $4::timestamptz[]) WITH ORDINALITY AS q(rule, key, from_at, to_at, i))
		SELECT q.i, s.at, s.n::bigint, s.failed::bigint FROM q CROSS JOIN LATERAL (
		    SELECT s.at, s.n, s.failed FROM audit.alert_stamps s
		    WHERE s.rule = q.rule AND s.key = q.key AND s.at > q.from_at AND s.at <= q.to_at OFFSET 0) s
		UNION ALL
		SELECT q.i, NULL, coalesce(s.n, 0) + coalesce(b.n, 0), coalesce(s.failed, 0) + coalesce(b.failed, 0) FROM q
		CROSS JOIN LATERAL (
		    SELECT sum(s.n)::bigint AS n, sum(s.failed)::bigint AS failed FROM audit.alert_stamps s
		    WHERE s.rule = q.rule AND s.key = q.key AND s.at > q.to_at AND s.at < date_trunc('second', q.to_at) + interval '1 second') s
		CROSS JOIN LATERAL (
		    SELECT sum(b.n)::bigint AS n, sum(b.failed)::bigint AS failed FROM audit.alert_buckets b
		    WHERE b.rule = q.rule AND b.key = q.key AND b.at_second >= date_trunc('second', q.to_at) + interval '1 second') b
		WHERE s.n IS NOT NULL OR b.n IS NOT NULL`

// record writes a row per alert raised and returns the alerts it wrote. A row is per rule,
// key and window start: should two writers ever both decide to raise one (they cannot
// while the chain head serialises them), only the first row is kept, and only what was
// kept is published.
func record(ctx context.Context, tx pgx.Tx, raised []raisedAlert) ([]raisedAlert, error) {
	rules, digests := make([]string, len(raised)), make([][]byte, len(raised))
	starts, at, seqs := make([]time.Time, len(raised)), make([]time.Time, len(raised)), make([]int64, len(raised))
	for i, r := range raised {
		rules[i], digests[i], starts[i], at[i], seqs[i] = r.rule, r.digest, r.start, r.at, int64(r.seq)
	}
	kept, err := tx.Query(ctx, `INSERT INTO audit.alerts_raised (rule, key, window_start, raised_at, stream_seq)
		SELECT * FROM unnest($1::text[], $2::bytea[], $3::timestamptz[], $4::timestamptz[], $5::bigint[])
		ON CONFLICT DO NOTHING RETURNING rule, key, window_start`, rules, digests, starts, at, seqs)
	if err != nil {
		return nil, fmt.Errorf("record alerts: %w", err)
	}
	ours := map[string]bool{}
	var rule string
	var digest []byte
	var start time.Time
	if _, err := pgx.ForEachRow(kept, []any{&rule, &digest, &start}, func() error {
		ours[claimKey(rule, digest, start)] = true
		return nil
	}); err != nil {
		return nil, fmt.Errorf("record alerts: %w", err)
	}
	var out []raisedAlert
	for _, r := range raised {
		if ours[claimKey(r.rule, r.digest, r.start)] {
			out = append(out, r)
		}
	}
	return out, nil
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

// ruleDetail is the detail of each rule's alert: the count and the window (for a ratio
// rule: the provider, the failed calls or the mails bounced or complained of, the calls or
// mails sent, and the window). None names an address.
var ruleDetail = map[string]string{
	RuleDeliveryFailureRatio:    "provider %s failed %d of %d calls within %v",
	RuleBounceRate:              "provider %s: %d permanent bounces among %d mails sent within %v",
	RuleComplaintRate:           "provider %s: %d spam complaints among %d mails sent within %v",
	RuleRequestBurstIP:          "%d codes issued for one client network within %v",
	RuleVerifyFailuresTenant:    "%d failed verifications within %v",
	RuleVerifyFailuresRecipient: "%d failed verifications for one recipient within %v",
	RuleSupersedeStorm:          "%d challenges superseded within %v",
}

func claimKey(rule string, digest []byte, start time.Time) string {
	return fmt.Sprintf("%s|%x|%d", rule, digest, start.UnixMicro())
}

// recipientsOf finds in the log the recipient hash of each challenge that the failed
// verifications of rows name: the first row of the challenge that has one (its
// otp.issued), whichever auditor wrote it, the rows of this batch included.
func recipientsOf(ctx context.Context, tx pgx.Tx, rows []*Row) (map[challengeRef]string, error) {
	var tenants, ids []string
	seen := map[challengeRef]bool{}
	for _, r := range rows {
		e, ok := r.Event.(events.VerifyFailed)
		if !ok || e.ChallengeID == "" || seen[challengeRef{r.Tenant, e.ChallengeID}] {
			continue
		}
		seen[challengeRef{r.Tenant, e.ChallengeID}] = true
		tenants, ids = append(tenants, r.Tenant), append(ids, e.ChallengeID)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	found, err := tx.Query(ctx, `SELECT DISTINCT ON (e.tenant, e.challenge_id) e.tenant, e.challenge_id, e.recipient_hash
		FROM unnest($1::text[], $2::text[]) AS q(tenant, challenge_id)
		JOIN audit.events e ON e.tenant = q.tenant AND e.challenge_id = q.challenge_id AND e.challenge_id <> ''
		WHERE e.recipient_hash IS NOT NULL
		ORDER BY e.tenant, e.challenge_id, e.stream_seq`, tenants, ids)
	if err != nil {
		return nil, fmt.Errorf("recipients of failed verifications: %w", err)
	}
	out := map[challengeRef]string{}
	var tenant, id string
	var hash []byte
	if _, err := pgx.ForEachRow(found, []any{&tenant, &id, &hash}, func() error {
		out[challengeRef{tenant, id}] = string(hash)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("recipients of failed verifications: %w", err)
	}
	return out, nil
}

// prune deletes, at most once per pruneEvery, the alert state no window reaches any more:
// older than keep before the newest event of rows (never ahead of this process's clock,
// so an event stamped in the future does not empty the windows).
func (a *alerter) prune(ctx context.Context, pool *pgxpool.Pool, rows []*Row) (int64, error) {
	a.mu.Lock()
	if time.Since(a.lastPrune) < pruneEvery {
		a.mu.Unlock()
		return 0, nil
	}
	a.lastPrune = time.Now()
	a.mu.Unlock()
	var newest time.Time
	for _, r := range rows {
		if r.OccurredAt.After(newest) {
			newest = r.OccurredAt
		}
	}
	if now := time.Now(); newest.After(now) {
		newest = now
	}
	// Each enabled rule's state twice its own window; then the alerts raised, and what
	// rules no longer enabled left, twice the longest.
	var rules []string
	var cutoffs []time.Time
	for name, t := range a.th {
		if t.Count > 0 {
			rules, cutoffs = append(rules, name), append(cutoffs, newest.Add(-2*t.Window))
		}
	}
	var byRule, rest int64
	if err := pool.QueryRow(ctx, `SELECT audit.prune_alert_rules($1, $2)`, rules, cutoffs).Scan(&byRule); err != nil {
		return 0, err
	}
	err := pool.QueryRow(ctx, `SELECT audit.prune_alerts($1)`, newest.Add(-a.keep)).Scan(&rest)
	return byRule + rest, err
}
