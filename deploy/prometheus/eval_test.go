package prometheus_test

import (
	"context"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/promql/promqltest"
	"github.com/prometheus/prometheus/storage"
)

// The alert unit tests promtool runs (`promtool test rules`), done with Prometheus's own
// PromQL engine and test storage: series loaded in promqltest's `load` notation, each alert's
// expression from alerts.yaml evaluated every minute, and an alert firing at a time when its
// expression returned the same series at every evaluation of its for: before then.

type alertCase struct {
	name   string
	alert  string
	series string        // promqltest load block body, one series a line, 1m apart
	at     time.Duration // evaluation time
	want   []string      // the firing series, as label sets ({provider="ses"}); none: silent
}

func TestAlertsFire(t *testing.T) {
	rules := map[string]rule{}
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			rules[r.Alert] = r
		}
	}
	exported := exportedMetrics(t)
	disp := `job="otpflow-dispatcher", instance="d1"`
	aud := `job="otpflow-auditor", instance="a1"`
	sent := func(tenant, provider string) string {
		return `otpflow_auditor_mails_sent_total{` + aud + `, tenant="` + tenant + `", provider="` + provider + `"}`
	}
	feedback := func(tenant, kind, bounceType string) string {
		return `otpflow_auditor_feedback_total{` + aud + `, tenant="` + tenant + `", provider="ses", kind="` + kind + `", bounce_type="` + bounceType + `"}`
	}
	fires := map[string]bool{}
	for _, c := range []alertCase{
		{name: "all services up", alert: "OtpServiceDown", at: 10 * time.Minute, series: `
			up{job="otpflow-issuer", instance="i1"} 1x20
			up{job="otpflow-dispatcher", instance="d1"} 1x20
			up{job="otpflow-verifier", instance="v1"} 1x20
			up{job="otpflow-auditor", instance="a1"} 1x20`},
		{name: "every issuer down", alert: "OtpServiceDown", at: 10 * time.Minute, series: `
			up{job="otpflow-issuer", instance="i1"} 0x20
			up{job="otpflow-issuer", instance="i2"} 0x20
			up{job="otpflow-dispatcher", instance="d1"} 1x20
			up{job="otpflow-verifier", instance="v1"} 1x20
			up{job="otpflow-auditor", instance="a1"} 1x20`,
			want: []string{`{job="otpflow-issuer"}`}},
		{name: "no auditor scraped at all", alert: "OtpServiceDown", at: 10 * time.Minute, series: `
			up{job="otpflow-issuer", instance="i1"} 1x20
			up{job="otpflow-dispatcher", instance="d1"} 1x20
			up{job="otpflow-verifier", instance="v1"} 1x20`,
			want: []string{`{job="otpflow-auditor"}`}},
		{name: "one of two issuers down", alert: "OtpServiceInstanceDown", at: 10 * time.Minute, series: `
			up{job="otpflow-issuer", instance="i1"} 1x20
			up{job="otpflow-issuer", instance="i2"} 1 1 1 0x20`,
			want: []string{`{instance="i2", job="otpflow-issuer"}`}},

		{name: "half of the SES calls fail", alert: "OtpProviderFailureRatioHigh", at: 30 * time.Minute, series: `
			otpflow_dispatcher_sends_total{` + disp + `, provider="ses", outcome="ok"} 0+60x40
			otpflow_dispatcher_sends_total{` + disp + `, provider="ses", outcome="transient"} 0+60x40
			otpflow_dispatcher_sends_total{` + disp + `, provider="smtp", outcome="ok"} 0+60x40`,
			want: []string{`{provider="ses"}`}},
		{name: "permanent failures are the message's, not the provider's", alert: "OtpProviderFailureRatioHigh", at: 30 * time.Minute, series: `
			otpflow_dispatcher_sends_total{` + disp + `, provider="ses", outcome="ok"} 0+60x40
			otpflow_dispatcher_sends_total{` + disp + `, provider="ses", outcome="permanent"} 0+60x40`},
		{name: "a few failures on a quiet provider", alert: "OtpProviderFailureRatioHigh", at: 30 * time.Minute, series: `
			otpflow_dispatcher_sends_total{` + disp + `, provider="smtp", outcome="ok"} 0+1x40
			otpflow_dispatcher_sends_total{` + disp + `, provider="smtp", outcome="transient"} 0+1x40`},

		{name: "a breaker flipping open and half-open", alert: "OtpProviderBreakerOpen", at: 20 * time.Minute, series: `
			otpflow_dispatcher_breaker_state{` + disp + `, provider="ses"} 0 0 0 0 2 1 2 1 2 1 2 1 2 1 2 1 2 1 2 1 2 1 2
			otpflow_dispatcher_breaker_state{` + disp + `, provider="smtp"} 0x22`,
			want: []string{`{provider="ses"}`}},
		{name: "a breaker open once, briefly", alert: "OtpProviderBreakerOpen", at: 20 * time.Minute, series: `
			otpflow_dispatcher_breaker_state{` + disp + `, provider="ses"} 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 2 1 0 0 0 0 0 0`},
		{name: "a tenant's sourcing stuck", alert: "OtpTenantRequestsNotSourced", at: 10 * time.Minute, series: `
			otpflow_tenant_requests_unsourced_age_seconds{job="otpflow-issuer", instance="i1", tenant="acme"} 0 0 0 30 90 150 210 270 330 390 450 510
			otpflow_tenant_requests_unsourced_age_seconds{job="otpflow-issuer", instance="i1", tenant="globex"} 0x12`,
			want: []string{`{tenant="acme"}`}},
		{name: "sourcing behind for a moment", alert: "OtpTenantRequestsNotSourced", at: 10 * time.Minute, series: `
			otpflow_tenant_requests_unsourced_age_seconds{job="otpflow-issuer", instance="i1", tenant="acme"} 0 0 0 0 0 0 0 0 75 0 0 0`},
		{name: "a tenant's durable not made", alert: "OtpIssuerConsumerMissing", at: 10 * time.Minute, series: `
			otpflow_issuer_consumer_missing{job="otpflow-issuer", instance="i1", consumer="issuer_acme"} 0 0 0 0 0 0x8
			otpflow_issuer_consumer_missing{job="otpflow-issuer", instance="i1", consumer="issuer_globex"} 0 0 0 0 1 1 1 1 1 1 1 1`,
			want: []string{`{consumer="issuer_globex"}`}},
		{name: "a durable missing while provisioning runs", alert: "OtpIssuerConsumerMissing", at: 10 * time.Minute, series: `
			otpflow_issuer_consumer_missing{job="otpflow-issuer", instance="i1", consumer="issuer_globex"} 0 0 0 0 0 0 0 0 0 1 0 0`},
		{name: "every breaker open", alert: "OtpAllProviderBreakersOpen", at: 10 * time.Minute, series: `
			otpflow_dispatcher_breaker_state{` + disp + `, provider="ses"} 2x20
			otpflow_dispatcher_breaker_state{` + disp + `, provider="smtp"} 2 1 2 1 2 1 2 1 2 1 2 1 2 1 2 1 2 1 2 1 2`,
			want: []string{`{}`}},
		{name: "one breaker of two open", alert: "OtpAllProviderBreakersOpen", at: 10 * time.Minute, series: `
			otpflow_dispatcher_breaker_state{` + disp + `, provider="ses"} 2x20
			otpflow_dispatcher_breaker_state{` + disp + `, provider="smtp"} 0x20`},

		// 600 mails an hour through SES for acme and globex, 3,000 through SMTP for acme.
		{name: "a tenant's permanent bounces at 10 %", alert: "OtpTenantBounceRateHigh", at: 75 * time.Minute, series: `
			` + sent("acme", "ses") + ` 0+10x80
			` + sent("acme", "smtp") + ` 0+50x80
			` + sent("globex", "ses") + ` 0+10x80
			` + feedback("acme", "bounced", "permanent") + ` 0+1x80
			` + feedback("acme", "mailbox_delivered", "") + ` 0+9x80`,
			want: []string{`{provider="ses", tenant="acme"}`}},
		{name: "transient, undetermined and suppressed bounces do not count", alert: "OtpTenantBounceRateHigh", at: 75 * time.Minute, series: `
			` + sent("acme", "ses") + ` 0+10x80
			` + feedback("acme", "bounced", "transient") + ` 0+2x80
			` + feedback("acme", "bounced", "undetermined") + ` 0+1x80
			` + feedback("acme", "bounced", "suppressed") + ` 0+1x80`},
		{name: "permanent bounces at 4 %", alert: "OtpTenantBounceRateHigh", at: 75 * time.Minute, series: `
			` + sent("acme", "ses") + ` 0+25x80
			` + feedback("acme", "bounced", "permanent") + ` 0+1x80`},
		{name: "60 mails an hour, every one bounced", alert: "OtpTenantBounceRateHigh", at: 75 * time.Minute, series: `
			` + sent("quiet", "ses") + ` 0+1x80
			` + feedback("quiet", "bounced", "permanent") + ` 0+1x80`},
		{name: "a tenant's complaints at 0.2 %", alert: "OtpTenantComplaintRateHigh", at: 75 * time.Minute, series: `
			` + sent("acme", "ses") + ` 0+500x80
			` + sent("globex", "ses") + ` 0+2000x80
			` + feedback("acme", "complained", "") + ` 0+1x80
			` + feedback("globex", "complained", "") + ` 0+1x80`,
			want: []string{`{provider="ses", tenant="acme"}`}},
		{name: "600 mails an hour, 60 complaints", alert: "OtpTenantComplaintRateHigh", at: 75 * time.Minute, series: `
			` + sent("quiet", "ses") + ` 0+10x80
			` + feedback("quiet", "complained", "") + ` 0+1x80`},
		{name: "bounces are no complaints", alert: "OtpTenantComplaintRateHigh", at: 75 * time.Minute, series: `
			` + sent("acme", "ses") + ` 0+500x80
			` + feedback("acme", "bounced", "permanent") + ` 0+10x80`},

		{name: "a dispatcher backlog that does not drain", alert: "OtpConsumerLagHigh", at: 20 * time.Minute, series: `
			otpflow_consumer_pending_messages{` + disp + `, stream="OTP_DISPATCH", consumer="dispatcher"} 0 0 0 0 0 5000+100x20
			otpflow_consumer_ack_pending_messages{` + disp + `, stream="OTP_DISPATCH", consumer="dispatcher"} 16x25
			otpflow_consumer_pending_messages{job="otpflow-dispatcher", instance="d2", stream="OTP_DISPATCH", consumer="dispatcher"} 0 0 0 0 0 5000+100x20
			otpflow_consumer_ack_pending_messages{job="otpflow-dispatcher", instance="d2", stream="OTP_DISPATCH", consumer="dispatcher"} 16x25
			otpflow_consumer_pending_messages{job="otpflow-auditor", instance="a1", stream="OTP_EVENTS", consumer="auditor"} 3x25
			otpflow_consumer_ack_pending_messages{job="otpflow-auditor", instance="a1", stream="OTP_EVENTS", consumer="auditor"} 0x25`,
			want: []string{`{consumer="dispatcher", stream="OTP_DISPATCH"}`}},
		{name: "a burst cleared in a minute", alert: "OtpConsumerLagHigh", at: 20 * time.Minute, series: `
			otpflow_consumer_pending_messages{` + disp + `, stream="OTP_DISPATCH", consumer="dispatcher"} 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 9000 0 0 0 0 0 0
			otpflow_consumer_ack_pending_messages{` + disp + `, stream="OTP_DISPATCH", consumer="dispatcher"} 16x21`},
		{name: "a delivery given back", alert: "OtpDeliveriesStuck", at: 10 * time.Minute, series: `
			otpflow_deliveries_stuck_total{job="otpflow-issuer", instance="i1", consumer="issuer"} 0 0 0 0 0 0 1 1 1 1 1 1`,
			want: []string{`{consumer="issuer"}`}},

		{name: "requests waiting 6 minutes", alert: "OtpRequestsStale", at: 20 * time.Minute, series: `
			otpflow_consumer_oldest_unsettled_age_seconds{job="otpflow-issuer", instance="i1", stream="OTP_REQUESTS", consumer="issuer"} 0 0 0 0 0 0 0 0 0 0 60+60x15`,
			want: []string{`{consumer="issuer", stream="OTP_REQUESTS"}`}},
		{name: "requests waiting seconds", alert: "OtpRequestsStale", at: 20 * time.Minute, series: `
			otpflow_consumer_oldest_unsettled_age_seconds{job="otpflow-issuer", instance="i1", stream="OTP_REQUESTS", consumer="issuer"} 2x25`},
		{name: "requests waiting 31 minutes", alert: "OtpRequestsNearingRetention", at: 40 * time.Minute, series: `
			otpflow_consumer_oldest_unsettled_age_seconds{job="otpflow-issuer", instance="i1", stream="OTP_REQUESTS", consumer="issuer"} 0+60x45`,
			want: []string{`{consumer="issuer", stream="OTP_REQUESTS"}`}},
		{name: "requests waiting 20 minutes", alert: "OtpRequestsNearingRetention", at: 20 * time.Minute, series: `
			otpflow_consumer_oldest_unsettled_age_seconds{job="otpflow-issuer", instance="i1", stream="OTP_REQUESTS", consumer="issuer"} 0+60x25`},

		{name: "dead letters", alert: "OtpDeadLetters", at: 10 * time.Minute, series: `
			otpflow_deliveries_settled_total{` + disp + `, consumer="dispatcher", outcome="dead_letter"} 0 0 0 0 0 0 2 2 2 2 2 2
			otpflow_deliveries_settled_total{` + disp + `, consumer="dispatcher", outcome="ack"} 0+100x11`,
			want: []string{`{consumer="dispatcher"}`}},
		{name: "only acks", alert: "OtpDeadLetters", at: 10 * time.Minute, series: `
			otpflow_deliveries_settled_total{` + disp + `, consumer="dispatcher", outcome="ack"} 0+100x11`},
		{name: "a dead letter that could not be written", alert: "OtpDeadLetterWriteFailing", at: 10 * time.Minute, series: `
			otpflow_deliveries_settled_total{job="otpflow-verifier", instance="v1", consumer="verifier", outcome="dead_letter_failed"} 0 0 0 0 0 0 1 1 1 1 1 1`,
			want: []string{`{consumer="verifier"}`}},

		{name: "wrong codes jump tenfold", alert: "OtpVerifyFailureSpike", at: 7*time.Hour + 20*time.Minute, series: `
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="verified"} 0+600x450
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="invalid_code"} 0+60x420 25200+600x30`,
			want: []string{`{}`}},
		{name: "wrong codes at their usual rate", alert: "OtpVerifyFailureSpike", at: 7*time.Hour + 20*time.Minute, series: `
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="verified"} 0+600x450
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="invalid_code"} 0+120x450`},
		{name: "most verifies fail", alert: "OtpVerifyFailureRatioHigh", at: 40 * time.Minute, series: `
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="verified"} 0+30x45
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="invalid_code"} 0+60x45
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="locked"} 0+10x45`,
			want: []string{`{}`}},
		{name: "internal errors", alert: "OtpVerifierInternalErrors", at: 20 * time.Minute, series: `
			otpflow_verifier_verifications_total{job="otpflow-verifier", instance="v1", status="internal_error"} 0+30x25`,
			want: []string{`{}`}},

		{name: "the check finds the log broken", alert: "OtpAuditChainCheckFailing", at: 60 * time.Minute, series: `
			otpflow_audit_verify_ok{job="otpflow-auditor", instance="a1"} 0x10 1x20 0x40`,
			want: []string{`{instance="a1", job="otpflow-auditor"}`}},
		{name: "a start, before the first check", alert: "OtpAuditChainCheckFailing", at: 60 * time.Minute, series: `
			otpflow_audit_verify_ok{job="otpflow-auditor", instance="a1"} 1x40 0x10 1x20`},
		{name: "no success for two hours", alert: "OtpAuditChainCheckStale", at: 3 * time.Hour, series: `
			otpflow_audit_verify_last_success_timestamp_seconds{job="otpflow-auditor", instance="a1"} 600x200`,
			want: []string{`{}`}},
		{name: "a success ten minutes ago", alert: "OtpAuditChainCheckStale", at: 3 * time.Hour, series: `
			otpflow_audit_verify_last_success_timestamp_seconds{job="otpflow-auditor", instance="a1"} 600x160 10200x40`},
		{name: "an auditor that never checked yet", alert: "OtpAuditChainCheckStale", at: 3 * time.Hour, series: `
			otpflow_audit_verify_last_success_timestamp_seconds{job="otpflow-auditor", instance="a1"} 0x200`},
		{name: "an anomaly alert", alert: "OtpAuditorAnomaly", at: 10 * time.Minute, series: `
			otpflow_auditor_alerts_total{job="otpflow-auditor", instance="a1", rule="verify_failures_tenant"} 0 0 0 0 0 0 0 0 1 1 1 1`,
			want: []string{`{rule="verify_failures_tenant"}`}},
	} {
		if len(c.want) > 0 {
			fires[c.alert] = true
		}
		t.Run(c.alert+"/"+c.name, func(t *testing.T) {
			r, ok := rules[c.alert]
			if !ok {
				t.Fatalf("no alert %s in alerts.yaml", c.alert)
			}
			// The test series are real ones too.
			for _, line := range strings.Split(c.series, "\n") {
				if end := strings.Index(line, "}"); end > 0 {
					checkSelectors(t, "test series", strings.TrimSpace(line[:end+1]), exported)
				}
			}
			load := "load 1m\n"
			for _, line := range strings.Split(c.series, "\n") {
				if line = strings.TrimSpace(line); line != "" {
					load += "  " + line + "\n"
				}
			}
			st := promqltest.LoadedStorage(t, load)
			got := firing(t, st, r, c.at)
			want := append([]string{}, c.want...)
			sort.Strings(want)
			if strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("%s at %v: firing %v, want %v", c.alert, c.at, got, want)
			}
		})
	}
	for name := range rules {
		if !fires[name] {
			t.Errorf("%s: no case shows it firing", name)
		}
	}
}

// firing returns the series r fires for at: those its expression returned at every
// evaluation (each minute) from at-for to at, as promtool and a rule group would see.
func firing(t *testing.T, st storage.Queryable, r rule, at time.Duration) []string {
	t.Helper()
	engine := promqltest.NewTestEngine(t, false, 0, promqltest.DefaultMaxSamplesPerQuery)
	var hold time.Duration
	if r.For != "" {
		d, err := model.ParseDuration(r.For)
		if err != nil {
			t.Fatal(err)
		}
		hold = time.Duration(d)
	}
	var active map[string]bool
	for ts := at - hold; ts <= at; ts += time.Minute {
		q, err := engine.NewInstantQuery(context.Background(), st, nil, r.Expr, time.Unix(0, 0).Add(ts))
		if err != nil {
			t.Fatalf("%s: %v", r.Alert, err)
		}
		res := q.Exec(context.Background())
		if res.Err != nil {
			t.Fatalf("%s at %v: %v", r.Alert, ts, res.Err)
		}
		vec, err := res.Vector()
		if err != nil {
			t.Fatalf("%s at %v: %v", r.Alert, ts, err)
		}
		now := map[string]bool{}
		for _, s := range vec {
			now[s.Metric.DropReserved(func(n string) bool { return n == model.MetricNameLabel }).String()] = true
		}
		if active == nil {
			active = now
		} else {
			for k := range active {
				if !now[k] {
					delete(active, k)
				}
			}
		}
		q.Close()
	}
	out := []string{}
	for k := range active {
		out = append(out, k)
	}
	sort.Strings(out)
	if len(out) == 0 {
		return nil
	}
	return out
}
