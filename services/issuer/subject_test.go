package issuer

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNoAddressOrIPAtRest: after requests with an address and an IP (IPv4 and IPv6),
// a resend, refusals by the recipient cooldown and the ip fanout, no table of the issuer
// holds the address in any case or the IP; the resend still went to the address as first
// written, read back from its sealed form.
func TestNoAddressOrIPAtRest(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_cooldown: 30s, recipient_per_hour: 5, ip_per_minute: 10}
    risk: {ip_fanout: {recipients: 2, window: 10m}}
`)
	const ana, ip4, bo, ip6 = "Ana.Lovelace@Example.COM", "203.0.113.77", "Bo.Ziggy@Example.org", "2001:db8:7:7::42"
	h.request(t, fmt.Sprintf(`{"request_id":"p1","recipient":%q,"purpose":"login","context":{"ip":%q,"session_id":"s-1"}}`, ana, ip4))
	h.request(t, fmt.Sprintf(`{"request_id":"p2","recipient":%q,"purpose":"login","context":{"ip":%q}}`, ana, ip4))
	h.request(t, fmt.Sprintf(`{"request_id":"p3","recipient":%q,"purpose":"login","context":{"ip":%q}}`, bo, ip6))
	h.request(t, fmt.Sprintf(`{"request_id":"p4","recipient":"cy@example.net","purpose":"login","context":{"ip":%q}}`, ip4))
	h.request(t, fmt.Sprintf(`{"request_id":"p5","recipient":"dee@example.net","purpose":"login","context":{"ip":%q}}`, ip4))
	h.issued(t, 3)
	rejected := h.rejections(t, 2)
	h.advance(31 * time.Second)
	h.request(t, fmt.Sprintf(`{"request_id":"p1","recipient":%q,"purpose":"login","resend":true,"context":{"ip":%q}}`, strings.ToLower(ana), ip4))
	if rejected[0].Limit != "recipient_cooldown" || rejected[1].Limit != "ip_fanout" {
		t.Fatalf("rejections %+v, want recipient_cooldown then ip_fanout", rejected)
	}
	issued := h.issued(t, 4)
	if r := issued[3]; r.RequestID != "p1" || r.CodeSeq != 2 {
		t.Fatalf("resend %+v", r)
	}
	jobs := testenv.WaitMessages(t, h.js, events.StreamDispatch, "", 4, 10*time.Second)
	if job := h.openJob(t, jobs[3]); job.Recipient != ana {
		t.Fatalf("the resend went to %q, want the address as first written", job.Recipient)
	}
	testenv.Eventually(t, 10*time.Second, "the outbox published", func() bool {
		var n int
		return h.pool.QueryRow(context.Background(), `SELECT count(*) FROM issuer.outbox`).Scan(&n) == nil && n == 0
	})

	dump, counts := testenv.DumpSchema(t, h.pool, Schema)
	for _, table := range []string{"challenges", "codes", "rate_log", "ip_recipients"} {
		if counts[table] == 0 {
			t.Fatalf("no %s rows: the check would prove nothing\n%s", table, dump)
		}
	}
	testenv.AssertNoPlaintext(t, dump, ana, bo, "cy@example.net", "dee@example.net", "lovelace", "ziggy", ip4, "2001:db8:7:7", "2001:0db8")
	// The keys name people by hash: the canonical address's, under the active key.
	if !strings.Contains(dump, rcptRate("acme", h.subjects.Subject("acme", ana), "login")) ||
		!strings.Contains(dump, ipRate("acme", h.subjects.Client("acme", ip4))) {
		t.Fatalf("rate-limit keys are not the subject hashes:\n%s", dump)
	}
}

// TestLimitsHoldAcrossSubjectKeyRotation: traffic under k1, then the issuer restarts with
// OTP_SUBJECT_KEY=k2:NEW,k1:OLD. The recipient cooldown and hourly cap, the ip fanout and
// the challenge binding all still count what happened under k1.
func TestLimitsHoldAcrossSubjectKeyRotation(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_cooldown: 30s, recipient_per_hour: 3, ip_per_minute: 0}
    risk: {ip_fanout: {recipients: 2, window: 10m}}
`)
	old := keys.Generate("k1", 32)
	h.start(t, old)
	h.request(t, `{"request_id":"c1","recipient":"ana@example.com","purpose":"login"}`)
	h.request(t, `{"request_id":"m1","recipient":"Kim@Example.com","purpose":"login"}`)
	h.issued(t, 2)
	h.advance(31 * time.Second)
	h.request(t, `{"request_id":"c2","recipient":"ana@example.com","purpose":"login"}`)
	h.request(t, `{"request_id":"f1","recipient":"x1@example.com","purpose":"login","context":{"ip":"198.51.100.7"}}`)
	h.request(t, `{"request_id":"f2","recipient":"x2@example.com","purpose":"login","context":{"ip":"198.51.100.7"}}`)
	h.issued(t, 5)

	h.start(t, keys.Generate("k2", 32)+","+old)
	if h.subjects.ActiveID() != "k2" {
		t.Fatalf("active subject key %s", h.subjects.ActiveID())
	}
	h.request(t, `{"request_id":"c3","recipient":"ANA@example.com","purpose":"login"}`) // within the cooldown of c2
	h.request(t, `{"request_id":"f3","recipient":"x3@example.com","purpose":"login","context":{"ip":"198.51.100.7"}}`)
	h.rejections(t, 2)
	h.advance(31 * time.Second)
	h.request(t, `{"request_id":"c4","recipient":"ana@example.com","purpose":"login"}`) // the third this hour
	h.issued(t, 6)
	h.advance(31 * time.Second)
	h.request(t, `{"request_id":"c5","recipient":"ana@example.com","purpose":"login"}`) // the fourth: over the cap
	h.request(t, `{"request_id":"m1","recipient":"kim@example.co","purpose":"login","resend":true}`)
	h.request(t, `{"request_id":"f1b","recipient":"x1@example.com","purpose":"login","context":{"ip":"198.51.100.7"}}`) // seen under k1
	h.request(t, `{"request_id":"m1","recipient":"KIM@example.com","purpose":"login","resend":true}`)
	rejected := h.rejections(t, 4)
	// In request order: within one batch, rejections decided in the issue transaction
	// (the outbox) and the others are published apart, so the stream's order of two
	// rejections of one batch is not the requests' order.
	slices.SortFunc(rejected, func(a, b events.Rejected) int { return cmp.Compare(a.RequestSeq, b.RequestSeq) })
	for i, want := range []struct{ id, reason, limit string }{
		{"c3", "rate_limited", "recipient_cooldown"},
		{"f3", "risk", "ip_fanout"},
		{"c5", "rate_limited", "recipient_per_hour"},
		{"m1", "challenge_mismatch", ""},
	} {
		if r := rejected[i]; r.RequestID != want.id || string(r.Reason) != want.reason || r.Limit != want.limit {
			t.Errorf("rejection %d: %+v, want %s %s %s", i, r, want.id, want.reason, want.limit)
		}
	}
	issued := h.issued(t, 8)
	if issued[6].RequestID != "f1b" || issued[7].RequestID != "m1" || issued[7].CodeSeq != 2 || issued[7].RecipientMasked != "K***@Example.com" {
		t.Fatalf("after the rotation: %+v %+v", issued[6], issued[7])
	}
	// New state is written under both keys, so a replica still on k1 reads it whole.
	var n int
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT cardinality(stamps) FROM issuer.rate_log WHERE key = $1`,
		rcptRate("acme", h.subjects.SubjectHashes("acme", "ana@example.com")[1], "login")).Scan(&n), "k1 row")
	if n != 3 {
		t.Fatalf("the k1 row of ana holds %d sends, want 3", n)
	}
}

// TestRotationCountsEachSendOnce: during a rotation a send is recorded under every key of
// the ring, and the rows are merged when read, so each send must count once. With a cap
// of 5, two sends before the rotation and two after leave room for a fifth; counting the
// rows of both keys in full would refuse the fourth already.
func TestRotationCountsEachSendOnce(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_cooldown: 0s, recipient_per_hour: 5, ip_per_minute: 0}
    risk: {recipient_burst: {challenges: 0}}
`)
	old := keys.Generate("k1", 32)
	h.start(t, old)
	for i := 1; i <= 2; i++ {
		h.request(t, fmt.Sprintf(`{"request_id":"s%d","recipient":"ana@example.com","purpose":"login"}`, i))
		h.issued(t, i)
	}
	h.start(t, keys.Generate("k2", 32)+","+old)
	for i := 3; i <= 5; i++ {
		h.request(t, fmt.Sprintf(`{"request_id":"s%d","recipient":"ana@example.com","purpose":"login"}`, i))
		h.issued(t, i)
	}
	h.request(t, `{"request_id":"s6","recipient":"ana@example.com","purpose":"login"}`)
	if r := h.rejections(t, 1)[0]; r.RequestID != "s6" || r.Limit != "recipient_per_hour" {
		t.Fatalf("the sixth send: %+v, want refused by the hourly cap", r)
	}
}
