package auditor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// reputationRules turns every rule off but bounce_rate and complaint_rate, at their
// defaults.
func reputationRules() map[string]Threshold {
	th := DefaultThresholds()
	for rule, t := range th {
		if rule != RuleBounceRate && rule != RuleComplaintRate {
			t.Count = 0
			th[rule] = t
		}
	}
	return th
}

// mailRig feeds mails sent and their feedback to one auditor, the events 10 ms apart from
// the rig's base, and holds the auditor for its metrics.
type mailRig struct {
	*alertRig
	svc *Service
	at  time.Duration
	// sent counts the mails of each tenant and provider, for their ids.
	sent map[string]int
}

func newMailRig(t *testing.T) *mailRig {
	r := &mailRig{alertRig: newAlertRig(t, reputationRules()), sent: map[string]int{}}
	r.svc = r.auditor()
	testenv.Start(t, r.svc.Run)
	return r
}

func (r *mailRig) msg(typ events.Type, tenant, id string, body any) *nats.Msg {
	r.at += 10 * time.Millisecond
	m, err := events.NewMsg(typ, tenant, id, "", body, events.Envelope{Source: "test", Time: r.base.Add(r.at)})
	testenv.Must(r.t, err, "msg")
	return m
}

// send publishes n otp.delivered of tenant through provider, each its own challenge.
func (r *mailRig) send(tenant, provider string, n int) {
	var msgs []*nats.Msg
	for range n {
		k := tenant + "|" + provider
		r.sent[k]++
		ch := fmt.Sprintf("%s-%s-%d", tenant, provider, r.sent[k])
		msgs = append(msgs, r.msg(events.TypeDelivered, tenant, "delivered:"+ch+":1", events.Delivered{ChallengeID: ch,
			Tenant: tenant, RequestID: "r-" + ch, CodeSeq: 1, Provider: provider, ProviderMessageID: "m-" + ch, Attempts: 1}))
	}
	testenv.Must(r.t, platform.PublishAll(context.Background(), r.js, msgs), "publish the sends")
}

// feedback publishes n otp.feedback of tenant from SES like f.
func (r *mailRig) feedback(tenant string, n int, f events.Feedback) {
	var msgs []*nats.Msg
	for range n {
		r.n++
		f.Tenant, f.ChallengeID, f.CodeSeq, f.Provider = tenant, fmt.Sprintf("%s-ses-%d", tenant, r.n), 1, "ses"
		f.ProviderMessageID = fmt.Sprintf("m-%d", r.n)
		msgs = append(msgs, r.msg(events.TypeFeedback, tenant, fmt.Sprintf("feedback:ses:n-%d", r.n), f))
	}
	testenv.Must(r.t, platform.PublishAll(context.Background(), r.js, msgs), "publish the feedback")
}

// reputationAlerts are the alerts on the stream, by tenant, for one rule, each checked to
// name no address.
func (r *mailRig) reputationAlerts(rule string) map[string]events.Alert {
	r.t.Helper()
	out := map[string]events.Alert{}
	for _, a := range r.alerts() {
		if a.Rule != rule {
			r.t.Errorf("alert of rule %s: %+v", a.Rule, a)
			continue
		}
		if _, dup := out[a.Tenant]; dup {
			r.t.Errorf("a second %s alert for %s: %+v", rule, a.Tenant, a)
		}
		if strings.Contains(a.Detail, "@") || a.SubjectHash != "" {
			r.t.Errorf("alert names a person: %+v", a)
		}
		out[a.Tenant] = a
	}
	return out
}

var (
	permanent = events.Feedback{Kind: events.FeedbackBounced, BounceType: "Permanent", BounceSubType: "General",
		Diagnostic: "smtp; 550 5.1.1 <address>: Recipient address rejected"}
	transient      = events.Feedback{Kind: events.FeedbackBounced, BounceType: "Transient", BounceSubType: "MailboxFull"}
	undecided      = events.Feedback{Kind: events.FeedbackBounced, BounceType: "Undetermined", BounceSubType: "Undetermined"}
	onOwnList      = events.Feedback{Kind: events.FeedbackBounced, BounceType: "Permanent", BounceSubType: "OnAccountSuppressionList"}
	complaint      = events.Feedback{Kind: events.FeedbackComplained, ComplaintType: "abuse"}
	reachedMailbox = events.Feedback{Kind: events.FeedbackMailboxDelivered, Diagnostic: "250 2.0.0 OK"}
)

// TestBounceRateAlert runs bounce_rate at its defaults (5 % of at least 100 mails sent
// through one provider within an hour) through the auditor:
//   - acme sends 100 mails through SES and 300 through SMTP; SES reports 4 permanent
//     bounces, and 30 transient, 5 undetermined and 5 for addresses on the account's own
//     suppression list, which SES does not count: no alert. Counting any of those, or
//     acme's SMTP mails, or globex's mails, gives another rate.
//   - globex sends 100 through SES with 4 permanent bounces: under 5 %, no alert.
//   - quiet sends 99 through SES with 20 permanent bounces: 20 %, but fewer than 100 mails.
//
// Then acme's fifth permanent bounce makes 5 % exactly, and quiet's 100th mail the
// minimum: one alert each, at that event; acme's sixth raises no second one within the
// hour, and globex none at all. The metrics count each mail and feedback once.
func TestBounceRateAlert(t *testing.T) {
	r := newMailRig(t)
	r.send("globex", "ses", 100)
	r.send("acme", "ses", 100)
	r.send("acme", "smtp", 300)
	r.send("quiet", "ses", 99)
	r.feedback("acme", 4, permanent)
	r.feedback("acme", 30, transient)
	r.feedback("acme", 5, undecided)
	r.feedback("acme", 5, onOwnList)
	r.feedback("acme", 20, reachedMailbox)
	r.feedback("globex", 4, permanent)
	r.feedback("quiet", 20, permanent)
	r.settled()
	if got := r.alerts(); len(got) != 0 {
		t.Fatalf("alerts before any tenant is at 5 %% of 100 mails: %+v", got)
	}

	r.feedback("acme", 1, permanent)
	acmeAt := r.base.Add(r.at)
	r.send("quiet", "ses", 1)
	quietAt := r.base.Add(r.at)
	r.feedback("acme", 1, permanent)
	r.settled()
	got := r.reputationAlerts(RuleBounceRate)
	want := map[string]events.Alert{
		"acme": {Tenant: "acme", Rule: RuleBounceRate, Severity: "warning", Value: 0.05, Threshold: 0.05, RaisedAt: acmeAt,
			Detail: "provider ses: 5 permanent bounces among 100 mails sent within 1h0m0s"},
		"quiet": {Tenant: "quiet", Rule: RuleBounceRate, Severity: "warning", Value: 0.2, Threshold: 0.05, RaisedAt: quietAt,
			Detail: "provider ses: 20 permanent bounces among 100 mails sent within 1h0m0s"},
	}
	if len(got) != len(want) {
		t.Fatalf("bounce_rate alerts for %v, want acme and quiet: %+v", sortedTenants(got), got)
	}
	for tenant, w := range want {
		g := got[tenant]
		if g.Value != w.Value || g.Threshold != w.Threshold || g.Detail != w.Detail || !g.RaisedAt.Equal(w.RaisedAt) || g.Severity != w.Severity {
			t.Errorf("%s: alert %+v, want %+v", tenant, g, w)
		}
	}
	if v := testutil.ToFloat64(r.svc.alerts.raised.WithLabelValues(RuleBounceRate)); v != 2 {
		t.Errorf("otpflow_auditor_alerts_total{rule=bounce_rate} = %v, want 2", v)
	}

	for _, c := range []struct {
		labels []string
		want   float64
	}{
		{[]string{"acme", "ses"}, 100}, {[]string{"acme", "smtp"}, 300}, {[]string{"globex", "ses"}, 100}, {[]string{"quiet", "ses"}, 100},
	} {
		if v := testutil.ToFloat64(r.svc.reputation.sent.WithLabelValues(c.labels...)); v != c.want {
			t.Errorf("otpflow_auditor_mails_sent_total%v = %v, want %v", c.labels, v, c.want)
		}
	}
	for _, c := range []struct {
		labels []string
		want   float64
	}{
		{[]string{"acme", "ses", "bounced", "permanent"}, 6},
		{[]string{"acme", "ses", "bounced", "transient"}, 30},
		{[]string{"acme", "ses", "bounced", "undetermined"}, 5},
		{[]string{"acme", "ses", "bounced", "suppressed"}, 5},
		{[]string{"acme", "ses", "mailbox_delivered", ""}, 20},
		{[]string{"globex", "ses", "bounced", "permanent"}, 4},
		{[]string{"quiet", "ses", "bounced", "permanent"}, 20},
	} {
		if v := testutil.ToFloat64(r.svc.reputation.feedback.WithLabelValues(c.labels...)); v != c.want {
			t.Errorf("otpflow_auditor_feedback_total%v = %v, want %v", c.labels, v, c.want)
		}
	}
}

// TestComplaintRateAlert runs complaint_rate at its defaults (0.1 % of at least 1,000
// mails sent within an hour): acme's 2 complaints among 999 mails are too few mails to
// judge, globex's 1 among 2,000 is under the rate, and bounces are no complaints; then
// acme's 1,000th mail (0.2 %) and globex's second complaint (0.1 % exactly) raise one
// alert each. Counted together, the two tenants' 3 complaints among 2,999 mails would
// have raised one before.
func TestComplaintRateAlert(t *testing.T) {
	r := newMailRig(t)
	r.send("acme", "ses", 999)
	r.send("globex", "ses", 2000)
	r.feedback("acme", 2, complaint)
	r.feedback("globex", 1, complaint)
	r.feedback("globex", 40, permanent) // 2 %: no bounce_rate alert, and no complaint
	r.settled()
	if got := r.alerts(); len(got) != 0 {
		t.Fatalf("alerts before any tenant is at 0.1 %% of 1,000 mails: %+v", got)
	}

	r.send("acme", "ses", 1)
	acmeAt := r.base.Add(r.at)
	r.feedback("globex", 1, complaint)
	globexAt := r.base.Add(r.at)
	r.settled()
	got := r.reputationAlerts(RuleComplaintRate)
	want := map[string]events.Alert{
		"acme": {Value: 0.002, Threshold: 0.001, RaisedAt: acmeAt,
			Detail: "provider ses: 2 spam complaints among 1000 mails sent within 1h0m0s"},
		"globex": {Value: 0.001, Threshold: 0.001, RaisedAt: globexAt,
			Detail: "provider ses: 2 spam complaints among 2000 mails sent within 1h0m0s"},
	}
	if len(got) != len(want) {
		t.Fatalf("complaint_rate alerts for %v, want acme and globex: %+v", sortedTenants(got), got)
	}
	for tenant, w := range want {
		g := got[tenant]
		if g.Value != w.Value || g.Threshold != w.Threshold || g.Detail != w.Detail || !g.RaisedAt.Equal(w.RaisedAt) {
			t.Errorf("%s: alert %+v, want %+v", tenant, g, w)
		}
	}
	if v := testutil.ToFloat64(r.svc.reputation.feedback.WithLabelValues("globex", "ses", "complained", "")); v != 2 {
		t.Errorf("otpflow_auditor_feedback_total{globex, complained} = %v, want 2", v)
	}
}

func sortedTenants(m map[string]events.Alert) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// TestParseReputationThresholds: the two rules are overridden as every rule is, in
// OTP_ALERT_RULES; one given without a ratio keeps its default share, and a count of 0
// turns it off.
func TestParseReputationThresholds(t *testing.T) {
	def := DefaultThresholds()
	if def[RuleBounceRate] != (Threshold{Count: 100, Window: time.Hour, Ratio: 0.05}) ||
		def[RuleComplaintRate] != (Threshold{Count: 1000, Window: time.Hour, Ratio: 0.001}) {
		t.Fatalf("defaults %+v, %+v", def[RuleBounceRate], def[RuleComplaintRate])
	}
	th, err := ParseThresholds("bounce_rate=50/30m, complaint_rate=500/2h/0.002")
	testenv.Must(t, err, "parse")
	if th[RuleBounceRate] != (Threshold{Count: 50, Window: 30 * time.Minute, Ratio: 0.05}) ||
		th[RuleComplaintRate] != (Threshold{Count: 500, Window: 2 * time.Hour, Ratio: 0.002}) {
		t.Fatalf("thresholds %+v, %+v", th[RuleBounceRate], th[RuleComplaintRate])
	}
	th, err = ParseThresholds("complaint_rate=0/1h")
	testenv.Must(t, err, "parse")
	if th[RuleComplaintRate].Count != 0 || th[RuleBounceRate] != def[RuleBounceRate] {
		t.Fatalf("thresholds %+v", th)
	}
	if _, err := ParseThresholds("bounce_rate=100/1h/5"); err == nil {
		t.Error("a ratio of 5 accepted")
	}
}

// TestFeedbackInTheTrail: the feedback of a request's mail shows in its trail, found by
// the challenge it names (it names no request), in stream order, under the request; a
// trail by address shows the feedback of that person's requests and nothing else of the
// tenant that names no request (someone else's feedback, an alert). No address in the
// output: the address of an event of an earlier release is masked, and the feedback
// carries the recipient as a hash only.
func TestFeedbackInTheTrail(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ},
		pool, js, testenv.Logger(io.Discard), prometheus.NewRegistry())
	testenv.Must(t, err, "auditor")
	testenv.Start(t, svc.Run)

	const ana, bo = "ana@example.com", "bo@example.com"
	anaHash, boHash := testSubjects.Subject("acme", ana), testSubjects.Subject("acme", bo)
	base := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var ids []string
	pub := func(typ events.Type, tenant, id string, secs int, body any) {
		m, err := events.NewMsg(typ, tenant, id, "", body, events.Envelope{Source: "test", Time: base.Add(time.Duration(secs) * time.Second)})
		testenv.Must(t, err, "msg")
		_, err = js.PublishMsg(context.Background(), m)
		testenv.Must(t, err, "publish")
		ids = append(ids, id)
	}
	// ana's first request, as an issuer of an earlier release wrote it: the address itself.
	pub(events.TypeIssued, "acme", "issued:c1:1", 0, jsonRaw(`{"challenge_id":"c1","tenant":"acme","request_id":"r1","code_seq":1,"max_attempts":5,"recipient":"ana@example.com"}`))
	pub(events.TypeDelivered, "acme", "delivered:c1:1", 1, events.Delivered{ChallengeID: "c1", Tenant: "acme", RequestID: "r1", CodeSeq: 1,
		Provider: "ses", ProviderMessageID: "0100-msg-1", Attempts: 1})
	pub(events.TypeIssued, "acme", "issued:c2:1", 2, events.Issued{ChallengeID: "c2", Tenant: "acme", RequestID: "r2", CodeSeq: 1,
		RecipientHash: boHash, RecipientMasked: "b***@example.com"})
	pub(events.TypeDelivered, "acme", "delivered:c2:1", 3, events.Delivered{ChallengeID: "c2", Tenant: "acme", RequestID: "r2", CodeSeq: 1, Provider: "ses"})
	pub(events.TypeIssued, "acme", "issued:c3:1", 4, events.Issued{ChallengeID: "c3", Tenant: "acme", RequestID: "r3", CodeSeq: 1,
		RecipientHash: anaHash, RecipientMasked: "a***@example.com", MaxAttempts: 5})
	// r3's send was ambiguous (the provider took it and gave no final answer); SES's
	// Delivery notification confirms it.
	pub(events.TypeDelivered, "acme", "delivered:c3:1", 5, events.Delivered{ChallengeID: "c3", Tenant: "acme", RequestID: "r3", CodeSeq: 1,
		Provider: "ses", ProviderMessageID: "0100-msg-3", Attempts: 1, Unconfirmed: true})
	pub(events.TypeFeedback, "acme", "feedback:ses:n-2", 6, events.Feedback{Tenant: "acme", ChallengeID: "c2", CodeSeq: 1, Kind: events.FeedbackComplained,
		RecipientHash: boHash, Provider: "ses", ComplaintType: "abuse"})
	pub(events.TypeFeedback, "acme", "feedback:ses:n-1", 7, events.Feedback{Tenant: "acme", ChallengeID: "c1", CodeSeq: 1, Kind: events.FeedbackBounced,
		RecipientHash: anaHash, Provider: "ses", ProviderMessageID: "0100-msg-1", BounceType: "Permanent", BounceSubType: "General",
		Diagnostic: "smtp; 550 5.1.1 <address>: Recipient address rejected"})
	pub(events.TypeFeedback, "acme", "feedback:ses:n-3", 8, events.Feedback{Tenant: "acme", ChallengeID: "c3", CodeSeq: 1, Kind: events.FeedbackMailboxDelivered,
		RecipientHash: anaHash, Provider: "ses", ProviderMessageID: "0100-msg-3", Diagnostic: "250 2.0.0 OK"})
	pub(events.TypeAlert, "acme", "alert:supersede_storm:x:1", 9, events.Alert{Tenant: "acme", Rule: RuleSupersedeStorm, Severity: "warning", Detail: "storm"})
	pub(events.TypeFeedback, "beta", "feedback:ses:n-4", 10, events.Feedback{Tenant: "beta", ChallengeID: "c1", CodeSeq: 1, Kind: events.FeedbackBounced,
		Provider: "ses", BounceType: "Transient"})
	testenv.Eventually(t, 10*time.Second, "the events written", func() bool {
		var n int
		_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM audit.events WHERE event_id = ANY($1)`, ids).Scan(&n)
		return n == len(ids)
	})

	bounced := "code 1 bounced (Permanent/General) per ses message 0100-msg-1: smtp; 550 5.1.1 <address>: Recipient address rejected"
	for _, c := range []struct {
		name           string
		request, email string
		want           []string // request, type and summary of each step
	}{
		{"by request", "r1", "", []string{
			"r1 otp.issued code 1 issued, 5 attempts, expires ",
			"r1 otp.delivered code 1 delivered via ses on delivery 1",
			"r1 otp.feedback " + bounced,
		}},
		{"by address", "", "Ana@Example.com", []string{
			"r1 otp.issued code 1 issued, 5 attempts, expires ",
			"r1 otp.delivered code 1 delivered via ses on delivery 1",
			"r3 otp.issued code 1 issued, 5 attempts, expires ",
			"r3 otp.delivered code 1 delivered via ses on delivery 1, unconfirmed",
			"r1 otp.feedback " + bounced,
			"r3 otp.feedback code 1 reached the recipient's mail server per ses message 0100-msg-3: 250 2.0.0 OK; confirms the send that otp.delivered left unconfirmed",
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			steps, err := Trail(context.Background(), pool, testSubjects, "acme", c.request, c.email)
			testenv.Must(t, err, "trail")
			var got []string
			var out strings.Builder // what otpflow audit trail prints, as text and as JSON
			for _, s := range steps {
				got = append(got, s.RequestID+" "+s.Type+" "+s.Summary)
				fmt.Fprintf(&out, "%s  %-20s %-12s %s\n", s.Time.UTC().Format("2006-01-02 15:04:05.000"), s.Type, s.RequestID, s.Summary)
				if s.Type == string(events.TypeFeedback) && (s.Recipient != "" || s.ChallengeID == "") {
					t.Errorf("feedback step %+v: want its challenge and no recipient", s)
				}
			}
			if strings.Join(got, "\n") != strings.Join(c.want, "\n") {
				t.Errorf("trail:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(c.want, "\n"))
			}
			js, _ := json.Marshal(steps)
			out.Write(js)
			testenv.AssertNoPlaintext(t, out.String(), ana, bo, "Ana@Example.com", anaHash, boHash)
		})
	}
}

// TestSummarizeFeedback: one line per kind of feedback, with what the provider said and
// no address or IP, even in a diagnostic that came unredacted.
func TestSummarizeFeedback(t *testing.T) {
	for _, tc := range []struct {
		name string
		ev   events.Feedback
		want string
	}{
		{"permanent bounce", events.Feedback{CodeSeq: 2, Kind: events.FeedbackBounced, Provider: "ses", ProviderMessageID: "m-1",
			BounceType: "Permanent", BounceSubType: "NoEmail", Diagnostic: "smtp; 550 5.1.1 <address>: unknown"},
			"code 2 bounced (Permanent/NoEmail) per ses message m-1: smtp; 550 5.1.1 <address>: unknown"},
		{"an address left in the diagnostic", events.Feedback{CodeSeq: 1, Kind: events.FeedbackBounced, Provider: "ses",
			BounceType: "Transient", Diagnostic: "452 4.2.2 ana@example.com over quota at 203.0.113.7"},
			"code 1 bounced (Transient) per ses: 452 4.2.2 <address> over quota at <ip>"},
		{"complaint", events.Feedback{CodeSeq: 1, Kind: events.FeedbackComplained, Provider: "ses", ProviderMessageID: "m-2", ComplaintType: "abuse"},
			"code 1 marked as spam (abuse) per ses message m-2"},
		{"delay", events.Feedback{CodeSeq: 1, Kind: events.FeedbackDelayed, Provider: "ses", DelayType: "MailboxFull"},
			"code 1 delayed (MailboxFull) per ses"},
		{"rejected", events.Feedback{CodeSeq: 1, Kind: events.FeedbackRejected, Provider: "ses", Diagnostic: "rendering failure"},
			"code 1 rejected by the provider after it took it per ses: rendering failure"},
		{"mailbox", events.Feedback{CodeSeq: 3, Kind: events.FeedbackMailboxDelivered, Provider: "ses", ProviderMessageID: "m-3"},
			"code 3 reached the recipient's mail server per ses message m-3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := summarize(string(events.TypeFeedback), tc.ev); got != tc.want {
				t.Errorf("summarize = %q, want %q", got, tc.want)
			}
		})
	}
}
