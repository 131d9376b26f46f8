package auditor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestParseThresholds(t *testing.T) {
	th, err := ParseThresholds("verify_failures_tenant=5/30s, delivery_failure_ratio=10/1m/0.25, supersede_storm=0/1m")
	if err != nil {
		t.Fatal(err)
	}
	if th[RuleVerifyFailuresTenant] != (Threshold{Count: 5, Window: 30 * time.Second}) ||
		th[RuleDeliveryFailureRatio] != (Threshold{Count: 10, Window: time.Minute, Ratio: 0.25}) ||
		th[RuleSupersedeStorm].Count != 0 || th[RuleRequestBurstIP] != DefaultThresholds()[RuleRequestBurstIP] {
		t.Fatalf("thresholds %+v", th)
	}
	for _, bad := range []string{"nope=1/1m", "verify_failures_tenant=5", "verify_failures_tenant=x/1m", "delivery_failure_ratio=5/1m/2"} {
		if _, err := ParseThresholds(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestAlertRules feeds each rule its signal through the real auditor and checks one
// otp.alert per rule, and none below the thresholds.
func TestAlertRules(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	th := map[string]Threshold{
		RuleVerifyFailuresRecipient: {Count: 3, Window: time.Minute},
		RuleVerifyFailuresTenant:    {Count: 5, Window: time.Minute},
		RuleDeliveryFailureRatio:    {Count: 4, Window: time.Minute, Ratio: 0.5},
		RuleRequestBurstIP:          {Count: 3, Window: time.Minute},
		RuleSupersedeStorm:          {Count: 3, Window: time.Minute},
	}
	reg := prometheus.NewRegistry()
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ, Alerts: th}, pool, js, testenv.Logger(io.Discard), reg)
	testenv.Must(t, err, "auditor")
	testenv.Start(t, svc.Run)

	n := 0
	pub := func(typ events.Type, tenant string, body string) {
		n++
		m, err := events.NewMsg(typ, tenant, fmt.Sprintf("ev-%d", n), "", jsonRaw(body), events.Envelope{Source: "test"})
		testenv.Must(t, err, "msg")
		_, err = js.PublishMsg(context.Background(), m)
		testenv.Must(t, err, "publish")
	}
	// Two challenges of one recipient (one of them from a burst IP), failures on both.
	for i, ip := range []string{"198.51.100.7", "::ffff:198.51.100.7", "198.51.100.7"} { // one client, spelt two ways
		pub(events.TypeIssued, "acme", fmt.Sprintf(`{"challenge_id":"c%d","request_id":"r%d","recipient":"ana@example.com","client_ip":%q}`, i+1, i+1, ip))
	}
	pub(events.TypeVerifyFailed, "acme", `{"challenge_id":"c1","request_id":"r1","status":"invalid_code"}`)
	pub(events.TypeVerifyFailed, "acme", `{"challenge_id":"c2","request_id":"r2","status":"invalid_code"}`)
	pub(events.TypeVerifyFailed, "acme", `{"challenge_id":"c2","request_id":"r2","status":"invalid_code"}`)
	pub(events.TypeVerifyFailed, "beta", `{"challenge_id":"x","request_id":"x","status":"not_found"}`)
	// SES failing three of four calls.
	pub(events.TypeDelivered, "acme", `{"challenge_id":"c1","provider":"smtp","provider_attempts":[{"provider":"ses","outcome":"transient"},{"provider":"ses","outcome":"transient"},{"provider":"smtp","outcome":"ok"}]}`)
	pub(events.TypeDelivered, "acme", `{"challenge_id":"c2","provider":"ses","provider_attempts":[{"provider":"ses","outcome":"provider_down"},{"provider":"ses","outcome":"ok"}]}`)
	// Supersede storm: three in a minute; a fourth raises nothing new.
	for i := 1; i <= 4; i++ {
		pub(events.TypeSuperseded, "acme", fmt.Sprintf(`{"challenge_id":"s%d","request_id":"s%d","superseded_by":"s%d"}`, i, i, i+1))
	}
	// Tenant failures: five in acme (three above plus two more).
	pub(events.TypeVerifyFailed, "acme", `{"challenge_id":"z1","request_id":"z1","status":"expired"}`)
	pub(events.TypeVerifyFailed, "acme", `{"challenge_id":"z2","request_id":"z2","status":"expired"}`)

	want := map[string]string{
		RuleVerifyFailuresRecipient: "3 failed verifications for one recipient",
		RuleRequestBurstIP:          "3 codes issued for one client network",
		RuleDeliveryFailureRatio:    "provider ses failed 3 of 4 calls",
		RuleSupersedeStorm:          "3 challenges superseded",
		RuleVerifyFailuresTenant:    "5 failed verifications",
	}
	var alerts []events.Alert
	var stored strings.Builder // the alerts as a reader of the stream sees them
	testenv.Eventually(t, 10*time.Second, "one alert per rule", func() bool {
		alerts = nil
		stored.Reset()
		for _, m := range testenv.Messages(t, js, events.StreamEvents, "otp.alert.*") {
			for k, v := range m.Header {
				stored.WriteString(k + ": " + strings.Join(v, ",") + "\n")
			}
			stored.Write(m.Data)
			stored.WriteString("\n")
			var a events.Alert
			_ = json.Unmarshal(m.Data, &a)
			alerts = append(alerts, a)
		}
		return len(alerts) >= len(want)
	})
	time.Sleep(300 * time.Millisecond)
	if len(alerts) != len(want) {
		t.Fatalf("%d alerts, want %d: %+v", len(alerts), len(want), alerts)
	}
	for rule := range want {
		if v := testutil.ToFloat64(svc.alerts.raised.WithLabelValues(rule)); v != 1 {
			t.Errorf("otpflow_auditor_alerts_total{rule=%q} = %v, want 1", rule, v)
		}
	}
	// No address or IP in any form: not whole, not masked, not as an unkeyed hash in the
	// alert's id. The person and the client are named by subject hash.
	testenv.AssertNoPlaintext(t, stored.String(), "ana@example.com", "a***@", "198.51.100", "198.51.x")
	for _, ip := range []string{"198.51.100.7", "::ffff:198.51.100.7"} {
		sum := sha256.Sum256([]byte("acme|" + events.ClientNetwork(ip)))
		testenv.AssertNoPlaintext(t, stored.String(), hex.EncodeToString(sum[:8]))
	}
	wantSubject := map[string]string{
		RuleVerifyFailuresRecipient: testSubjects.Subject("acme", "ana@example.com"),
		RuleRequestBurstIP:          testSubjects.Client("acme", "198.51.100.7"),
	}
	for _, a := range alerts {
		if a.SubjectHash != wantSubject[a.Rule] {
			t.Errorf("%s: subject hash %q, want %q", a.Rule, a.SubjectHash, wantSubject[a.Rule])
		}
		if !strings.Contains(a.Detail, want[a.Rule]) {
			t.Errorf("%s: detail %q, want %q", a.Rule, a.Detail, want[a.Rule])
		}
		if a.Rule == RuleDeliveryFailureRatio && a.Tenant != "_system" || a.Rule != RuleDeliveryFailureRatio && a.Tenant != "acme" {
			t.Errorf("%s raised for tenant %q", a.Rule, a.Tenant)
		}
	}
}
