package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback/sqstest"
)

// bounceOf is the SNS notification SES publishes to the configuration set's topic for a
// permanent bounce of the mail e, as the subscribed SQS queue holds it: the record names
// the mail by SES's message id and carries the tags the dispatcher set on it.
func bounceOf(t *testing.T, snsID string, e sestest.Email) string {
	t.Helper()
	tags := map[string][]string{"ses:configuration-set": {"otp"}}
	for k, v := range e.Tags {
		tags[k] = []string{v}
	}
	record, err := json.Marshal(map[string]any{"eventType": "Bounce",
		"bounce": map[string]any{"bounceType": "Permanent", "bounceSubType": "NoEmail", "timestamp": time.Now().UTC().Format(time.RFC3339Nano),
			"feedbackId": "fb-" + snsID, "bouncedRecipients": []map[string]any{{"emailAddress": e.To[0], "status": "5.1.1",
				"action": "failed", "diagnosticCode": "smtp; 550 5.1.1 <" + e.To[0] + ">: Recipient address rejected: User unknown"}}},
		"mail": map[string]any{"timestamp": time.Now().UTC().Format(time.RFC3339Nano), "messageId": e.MessageID,
			"source": e.From, "destination": e.To, "tags": tags}})
	testenv.Must(t, err, "record")
	body, err := json.Marshal(map[string]any{"Type": "Notification", "MessageId": snsID,
		"TopicArn": "arn:aws:sns:eu-west-1:123456789012:otp-feedback", "Message": string(record),
		"Timestamp": time.Now().UTC().Format(time.RFC3339Nano)})
	testenv.Must(t, err, "notification")
	return string(body)
}

// status asks otp.status.<tenant> what became of requestID, as an app does: raw JSON.
func (a *app) status(t *testing.T, tenant, requestID string) events.StatusReply {
	t.Helper()
	var reply events.StatusReply
	testenv.Eventually(t, 20*time.Second, "a status reply", func() bool {
		m, err := a.nc.Request("otp.status."+tenant, []byte(`{"request_id":"`+requestID+`"}`), 5*time.Second)
		return err == nil && json.Unmarshal(m.Data, &reply) == nil
	})
	return reply
}

// TestBounceSuppressesAndIsReported is the whole story of a dead address, through the
// pipeline: a code mailed through SES (its v2 wire protocol, the real SDK) bounces; SES's
// notification, read from the feedback queue (SQS's JSON protocol, the real SDK), becomes
// otp.feedback with kind bounced; otp.status answers bounced for the request within
// seconds; the next request for that address is refused as suppressed, and otp.status says
// so; the audit trail shows the bounce; an operator lists the entry, removes it, and the
// address is mailed again.
func TestBounceSuppressesAndIsReported(t *testing.T) {
	w := newWorld(t)
	srv := w.useSES(t)
	queue := sqstest.New(t)
	w.env["OTP_SES_FEEDBACK_QUEUE_URL"] = queue.QueueURL("otp-feedback")
	w.env["OTP_SQS_ENDPOINT"] = queue.URL()
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	const rcpt = "gone@example.com"

	a.request(t, "acme", `{"request_id":"dead-1","recipient":"`+rcpt+`","purpose":"login"}`)
	delivered := testenv.WaitMessages(t, a.js, events.StreamEvents, "otp.delivered.acme", 1, 30*time.Second)
	var d events.Delivered
	testenv.Must(t, json.Unmarshal(delivered[0].Data, &d), "delivered")
	mail := srv.Emails()[0]
	if d.Provider != "ses" || d.ProviderMessageID != mail.MessageID {
		t.Fatalf("delivered %+v, want through SES as %s", d, mail.MessageID)
	}
	// otp.status is a projection of the event stream: it says sent once it has read the
	// otp.delivered (the status projection's batches wait up to 20 ms to fill).
	var before events.StatusReply
	testenv.Eventually(t, 5*time.Second, "otp.status says sent before the bounce", func() bool {
		before = a.status(t, "acme", "dead-1")
		return before.State == events.StateSent
	})
	if before.CodeSeq != 1 || before.ExpiresAt.IsZero() {
		t.Fatalf("status before the bounce: %+v", before)
	}

	queue.Send("otp-feedback", bounceOf(t, "sns-bounce-1", mail))
	fb := testenv.WaitMessages(t, a.js, events.StreamEvents, "otp.feedback.acme", 1, 30*time.Second)
	var f events.Feedback
	testenv.Must(t, json.Unmarshal(fb[0].Data, &f), "feedback")
	if f.Kind != events.FeedbackBounced || f.ChallengeID != d.ChallengeID || f.BounceType != "Permanent" || f.ProviderMessageID != mail.MessageID {
		t.Fatalf("feedback %+v", f)
	}
	var st events.StatusReply
	testenv.Eventually(t, 5*time.Second, "otp.status says bounced", func() bool {
		st = a.status(t, "acme", "dead-1")
		return st.State == events.StateBounced
	})
	if !st.Found || !strings.Contains(st.Detail, "Permanent") || strings.Contains(st.Detail, rcpt) {
		t.Fatalf("status %+v", st)
	}

	// The next request for the address is refused, and otp.status says why. The issuer
	// reads feedback on its own consumer: wait until it has listed the address.
	issuerDB := w.env[platform.DatabaseURLVar("issuer")]
	testenv.Eventually(t, 10*time.Second, "the address listed", func() bool {
		_, out := w.cli(t, "suppression", "list", "--db", issuerDB, "--tenant", "acme", "--recipient", rcpt)
		return strings.Contains(out, "bounced")
	})
	a.request(t, "acme", `{"request_id":"dead-2","recipient":"`+rcpt+`","purpose":"login"}`)
	rej := testenv.WaitMessages(t, a.js, events.StreamEvents, "otp.rejected.acme", 1, 30*time.Second)
	var r events.Rejected
	testenv.Must(t, json.Unmarshal(rej[0].Data, &r), "rejected")
	if r.RequestID != "dead-2" || r.Reason != events.ReasonSuppressed || r.Limit != "bounced" {
		t.Fatalf("rejected %+v, want dead-2 refused as suppressed (bounced)", r)
	}
	testenv.Eventually(t, 5*time.Second, "otp.status says rejected: suppressed", func() bool {
		st = a.status(t, "acme", "dead-2")
		return st.State == events.StateRejected && st.Reason == events.ReasonSuppressed
	})
	if n := len(srv.Emails()); n != 1 {
		t.Fatalf("%d mails sent, want the one that bounced", n)
	}

	// The trail of the first request shows the bounce, and names no address.
	db := openDB(t, w.db)
	// Feedback carries no request id: it is audited under its challenge.
	testenv.Eventually(t, 30*time.Second, "the feedback audited", func() bool {
		var n int
		testenv.Must(t, db.QueryRow(context.Background(), `SELECT count(*) FROM audit.events
			WHERE tenant = 'acme' AND type = 'otp.feedback' AND challenge_id = $1`, d.ChallengeID).Scan(&n), "count")
		return n == 1
	})
	_, trail := w.cli(t, "audit", "trail", "--db", w.auditDB, "--tenant", "acme", "--request-id", "dead-1")
	if !strings.Contains(trail, string(events.TypeFeedback)) || !strings.Contains(trail, "bounced") || strings.Contains(trail, rcpt) {
		t.Fatalf("trail:\n%s", trail)
	}

	// An operator takes the address off the list (recorded), and it is mailed again.
	if code, out := w.cli(t, "suppression", "remove", "--db", issuerDB, "--tenant", "acme", "--recipient", rcpt); code != 0 ||
		!strings.Contains(out, "removed 1 entries (1 bounced)") {
		t.Fatalf("remove: exit %d: %s", code, out)
	}
	acts := testenv.WaitMessages(t, a.js, events.StreamEvents, "otp.operator_action.acme", 1, 10*time.Second)
	if !strings.Contains(string(acts[0].Data), "suppression.remove") || strings.Contains(string(acts[0].Data), rcpt) {
		t.Fatalf("operator action %s", acts[0].Data)
	}
	if code, _ := w.cli(t, "suppression", "remove", "--db", issuerDB, "--tenant", "acme", "--recipient", rcpt); code != 1 {
		t.Fatalf("a second remove: exit %d, want 1", code)
	}
	// (Another purpose: the first code's cooldown is per purpose, and still runs.)
	a.request(t, "acme", `{"request_id":"dead-3","recipient":"`+rcpt+`","purpose":"signup"}`)
	testenv.Eventually(t, 30*time.Second, "dead-3 mailed", func() bool { return len(srv.Emails()) == 2 })

	// An operator lists an address by hand, for a while.
	if code, out := w.cli(t, "suppression", "add", "--db", issuerDB, "--tenant", "acme", "--recipient", "Spam.Trap@Example.com", "--for", "1h"); code != 0 ||
		!strings.Contains(out, "added for 1h0m0s") {
		t.Fatalf("add: exit %d: %s", code, out)
	}
	_, out := w.cli(t, "suppression", "list", "--db", issuerDB, "--tenant", "acme", "--json")
	var entry struct {
		Reason        string     `json:"reason"`
		RecipientHash string     `json:"recipient_hash"`
		ExpiresAt     *time.Time `json:"expires_at"`
	}
	testenv.Must(t, json.Unmarshal([]byte(strings.TrimSpace(out)), &entry), "list json %q", out)
	if entry.Reason != "operator" || entry.ExpiresAt == nil || time.Until(*entry.ExpiresAt) > time.Hour || time.Until(*entry.ExpiresAt) < 50*time.Minute || strings.Contains(out, "@") {
		t.Fatalf("list %s", out)
	}
	a.request(t, "acme", `{"request_id":"trap-1","recipient":"spam.trap@example.com","purpose":"login"}`)
	testenv.Eventually(t, 5*time.Second, "trap-1 refused", func() bool {
		st = a.status(t, "acme", "trap-1")
		return st.State == events.StateRejected && st.Reason == events.ReasonSuppressed
	})
}
