package sesfeedback_test

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback/snstest"
)

const topicARN = "arn:aws:sns:eu-west-1:123456789012:otp-feedback"

// sesRecord is an SES event record of a mail with otpflow's tags, of eventType with its
// own object.
func sesRecord(t testing.TB, eventType, own string, body map[string]any) string {
	t.Helper()
	r := map[string]any{"eventType": eventType, own: body, "mail": map[string]any{"timestamp": "2026-12-01T10:00:00.012Z",
		"messageId": "0100018c1d2e3f40-5a6b7c8d-example-000000", "destination": []string{"ana@example.com"},
		"tags": map[string][]string{"tenant": {"acme"}, "challenge_id": {"2eedf1ad-5135-4c42-a28f-5b09316ec196"}, "code_seq": {"1"}}}}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func deliveryRecord(t testing.TB) string {
	return sesRecord(t, "Delivery", "delivery", map[string]any{"timestamp": "2026-12-01T10:00:00.900Z", "smtpResponse": "250 ok"})
}

func complaintRecord(t testing.TB) string {
	return sesRecord(t, "Complaint", "complaint", map[string]any{"timestamp": "2026-12-01T10:00:00.900Z",
		"complaintFeedbackType": "abuse", "feedbackId": "fb-forged"})
}

func verifier(t testing.TB, fetch sesfeedback.FetchFunc) *sesfeedback.Verifier {
	t.Helper()
	v, err := sesfeedback.NewVerifier(topicARN, fetch)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestVerifierTakesWhatSNSSigned: a notification SNS signed for the topic, with either
// signature version, with or without a Subject, verifies, and Parse reads it; the
// certificate is fetched once for all of them.
func TestVerifierTakesWhatSNSSigned(t *testing.T) {
	topic := snstest.New(t, topicARN, snstest.Options{})
	var fetches atomic.Int32
	fetch := snstest.Fetch(topic)
	v := verifier(t, func(ctx context.Context, url string) ([]byte, error) {
		fetches.Add(1)
		return fetch(ctx, url)
	})
	now := time.Now()
	subject := "Amazon SES Email Event Notification"
	for i, version := range []string{"1", "2", "1", "2"} {
		t.Run(fmt.Sprintf("version %s subject %v", version, i >= 2), func(t *testing.T) {
			n := snstest.Notification{Type: "Notification", MessageID: fmt.Sprintf("id-%d", i), TopicArn: topicARN, Message: deliveryRecord(t),
				Timestamp: now.Add(-time.Minute).UTC().Format(time.RFC3339Nano), SignatureVersion: version, SigningCertURL: snstest.CertURL}
			if i >= 2 {
				n.Subject = &subject
			}
			topic.Sign(&n)
			if err := v.Verify(context.Background(), []byte(n.JSON()), now); err != nil {
				t.Fatalf("a notification SNS signed: %v", err)
			}
			if p, err := sesfeedback.Parse([]byte(n.JSON()), now); err != nil || p.ID != n.MessageID {
				t.Fatalf("parse: %v, id %q", err, p.ID)
			}
		})
	}
	if n := fetches.Load(); n != 1 {
		t.Errorf("the certificate was fetched %d times, want once", n)
	}
}

// TestVerifierRefuses: whatever SNS did not sign as it stands, for this topic, lately,
// with its own certificate from its own host, is refused with its reason. The attack it
// stops: someone who saw one real notification of a person's mail and can write to the
// queue turns its Delivery into a Complaint, or sends it again under a new id, to have the
// person suppressed. Where a check is about the certificate's URL, the attacker serves a
// certificate of their own key there and signs with it, so only the check refuses it.
func TestVerifierRefuses(t *testing.T) {
	now := time.Now()
	at := now.Add(-time.Minute)
	sns := snstest.New(t, topicARN, snstest.Options{})
	expired := snstest.New(t, topicARN, snstest.Options{CertURL: "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-old.pem",
		NotBefore: now.Add(-400 * 24 * time.Hour), NotAfter: now.Add(-48 * time.Hour)})
	attackerURLs := []string{
		"http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem",
		"https://sns.eu-west-1.amazonaws.com.evil.example/SimpleNotificationService-test.pem",
		"https://evil.example/sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem",
		"https://sns.eu-west-1.amazonaws.com@evil.example/SimpleNotificationService-test.pem",
		"https://user@sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem",
		"https://sns.eu-west-1.amazonaws.com:8443/SimpleNotificationService-test.pem",
		"https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem.txt",
		"https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem?x=.pem",
		"https://SNS.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem",
		"https://sns.amazonaws.com/SimpleNotificationService-test.pem",
	}
	topics := []*snstest.Topic{sns, expired}
	attackers := map[string]*snstest.Topic{}
	for _, u := range attackerURLs {
		attackers[u] = snstest.New(t, topicARN, snstest.Options{CertURL: u})
		topics = append(topics, attackers[u])
	}
	v := verifier(t, snstest.Fetch(topics...))

	delivery := sns.Publish("b1f2c3d4-0000-5000-8000-000000000001", deliveryRecord(t), at, "2")
	subject := "Amazon SES Email Event Notification"
	withSubject := delivery
	withSubject.Subject = &subject
	sns.Sign(&withSubject)
	type change func(n *snstest.Notification)
	cases := []struct {
		name   string
		from   snstest.Notification
		change change
		reason string
	}{
		{"a Delivery turned into a Complaint, under a new id", delivery, func(n *snstest.Notification) {
			n.Message, n.MessageID = complaintRecord(t), "b1f2c3d4-0000-5000-8000-000000000002"
		}, sesfeedback.ReasonBadSignature},
		{"a Delivery turned into a Complaint", delivery, func(n *snstest.Notification) {
			n.Message = strings.Replace(n.Message, `"eventType":"Delivery"`, `"eventType":"Complaint"`, 1)
		}, sesfeedback.ReasonBadSignature},
		{"the same notification under a new id", delivery, func(n *snstest.Notification) { n.MessageID += "-again" }, sesfeedback.ReasonBadSignature},
		{"a later Timestamp", delivery, func(n *snstest.Notification) { n.Timestamp = now.UTC().Format(time.RFC3339Nano) }, sesfeedback.ReasonBadSignature},
		{"a Subject added", delivery, func(n *snstest.Notification) { n.Subject = &subject }, sesfeedback.ReasonBadSignature},
		{"its Subject taken away", withSubject, func(n *snstest.Notification) { n.Subject = nil }, sesfeedback.ReasonBadSignature},
		{"a version 2 signature called version 1", delivery, func(n *snstest.Notification) { n.SignatureVersion = "1" }, sesfeedback.ReasonBadSignature},
		{"signature version 3", delivery, func(n *snstest.Notification) { n.SignatureVersion = "3" }, sesfeedback.ReasonBadSignature},
		{"a signature that is not base64", delivery, func(n *snstest.Notification) { n.Signature = "not base64!" }, sesfeedback.ReasonBadSignature},
		{"another key's signature", delivery, func(n *snstest.Notification) { attackers[attackerURLs[1]].Sign(n) }, sesfeedback.ReasonBadSignature},
		{"no certificate at its URL", delivery, func(n *snstest.Notification) {
			n.SigningCertURL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-none.pem"
			sns.Sign(n)
		}, sesfeedback.ReasonBadSignature},
		{"a certificate expired at its Timestamp", delivery, func(n *snstest.Notification) {
			n.SigningCertURL = expired.CertURL
			expired.Sign(n)
		}, sesfeedback.ReasonBadSignature},
		{"signed by SNS for another topic", delivery, func(n *snstest.Notification) {
			n.TopicArn = "arn:aws:sns:eu-west-1:999999999999:attacker"
			sns.Sign(n) // SNS signs every topic with the one certificate
		}, sesfeedback.ReasonWrongTopic},
		{"signed for another topic, then given ours", delivery, func(n *snstest.Notification) {
			n.TopicArn = "arn:aws:sns:eu-west-1:999999999999:attacker"
			sns.Sign(n)
			n.TopicArn = topicARN
		}, sesfeedback.ReasonBadSignature},
		{"15 days old", delivery, func(n *snstest.Notification) {
			n.Timestamp = now.Add(-15 * 24 * time.Hour).UTC().Format(time.RFC3339Nano)
			sns.Sign(n)
		}, sesfeedback.ReasonStale},
		{"10 minutes ahead", delivery, func(n *snstest.Notification) {
			n.Timestamp = now.Add(10 * time.Minute).UTC().Format(time.RFC3339Nano)
			sns.Sign(n)
		}, sesfeedback.ReasonStale},
		{"a Timestamp that is not a time", delivery, func(n *snstest.Notification) { n.Timestamp = "yesterday"; sns.Sign(n) }, sesfeedback.ReasonMissingField},
		{"no signature", delivery, func(n *snstest.Notification) { n.Signature = "" }, sesfeedback.ReasonUnsigned},
		{"no certificate URL", delivery, func(n *snstest.Notification) { n.SigningCertURL = "" }, sesfeedback.ReasonUnsigned},
		{"a subscription confirmation", delivery, func(n *snstest.Notification) { n.Type = "SubscriptionConfirmation"; sns.Sign(n) }, sesfeedback.ReasonNotEvent},
	}
	for _, u := range attackerURLs {
		cases = append(cases, struct {
			name   string
			from   snstest.Notification
			change change
			reason string
		}{"a certificate at " + u, delivery, func(n *snstest.Notification) {
			n.SigningCertURL = u
			attackers[u].Sign(n)
		}, sesfeedback.ReasonBadSignature})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n := tc.from
			tc.change(&n)
			assertRefused(t, v.Verify(context.Background(), []byte(n.JSON()), now), tc.reason)
		})
	}
	t.Run("a raw SES record", func(t *testing.T) {
		assertRefused(t, v.Verify(context.Background(), []byte(deliveryRecord(t)), now), sesfeedback.ReasonUnsigned)
	})
	t.Run("not JSON", func(t *testing.T) {
		assertRefused(t, v.Verify(context.Background(), []byte("ana@example.com"), now), sesfeedback.ReasonMalformed)
	})
	// And the genuine one still verifies: the refusals are about the changes.
	for _, n := range []snstest.Notification{delivery, withSubject} {
		if err := v.Verify(context.Background(), []byte(n.JSON()), now); err != nil {
			t.Fatalf("the genuine notification: %v", err)
		}
	}
}

func assertRefused(t *testing.T, err error, reason string) {
	t.Helper()
	var e *sesfeedback.Error
	if !errors.As(err, &e) || e.Reason != reason {
		t.Fatalf("err %v, want reason %s", err, reason)
	}
	if strings.Contains(err.Error(), "ana@") || strings.Contains(err.Error(), "evil") || strings.Contains(err.Error(), "attacker") {
		t.Errorf("the refusal quotes the body: %v", err)
	}
}

// TestVerifierTriesAnUnreachableCertificateAgain: a certificate that cannot be fetched
// (SNS's host unreachable) is not a refusal, and is not remembered: the notification is
// worth reading again, and verifies once the host answers.
func TestVerifierTriesAnUnreachableCertificateAgain(t *testing.T) {
	topic := snstest.New(t, topicARN, snstest.Options{})
	var down atomic.Bool
	down.Store(true)
	fetch := snstest.Fetch(topic)
	v := verifier(t, func(ctx context.Context, url string) ([]byte, error) {
		if down.Load() {
			return nil, errors.New("dial tcp: connection refused")
		}
		return fetch(ctx, url)
	})
	now := time.Now()
	body := []byte(topic.Publish("m-1", deliveryRecord(t), now, "2").JSON())
	err := v.Verify(context.Background(), body, now)
	var e *sesfeedback.Error
	if err == nil || errors.As(err, &e) {
		t.Fatalf("unreachable certificate: %v, want an error that is not a refusal", err)
	}
	down.Store(false)
	if err := v.Verify(context.Background(), body, now); err != nil {
		t.Fatalf("once reachable: %v", err)
	}
}

// TestHTTPSFetch: the production fetch takes a certificate from the URL, refuses (as no
// certificate) a 4xx, a body over 64 KiB and a redirect to another host, and reports a
// 5xx and a timeout as failures to try again.
func TestHTTPSFetch(t *testing.T) {
	other := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("elsewhere")) }))
	t.Cleanup(other.Close)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/cert.pem":
			_, _ = w.Write([]byte("-----BEGIN CERTIFICATE-----"))
		case "/moved.pem":
			http.Redirect(w, r, "/cert.pem", http.StatusFound)
		case "/away.pem":
			http.Redirect(w, r, other.URL+"/cert.pem", http.StatusFound)
		case "/big.pem":
			_, _ = w.Write(make([]byte, 64<<10+1))
		case "/error.pem":
			http.Error(w, "busy", http.StatusServiceUnavailable)
		case "/slow.pem":
			<-r.Context().Done() // until the client gives up
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	client := srv.Client()
	client.Transport.(*http.Transport).TLSClientConfig.RootCAs.AddCert(other.Certificate())
	client.Timeout = 500 * time.Millisecond
	fetch := sesfeedback.HTTPSFetch(client)
	ctx := context.Background()
	for _, path := range []string{"/cert.pem", "/moved.pem"} {
		if b, err := fetch(ctx, srv.URL+path); err != nil || string(b) != "-----BEGIN CERTIFICATE-----" {
			t.Errorf("%s: %q, %v", path, b, err)
		}
	}
	for _, path := range []string{"/missing.pem", "/away.pem", "/big.pem"} {
		if _, err := fetch(ctx, srv.URL+path); !errors.Is(err, sesfeedback.ErrNoCert) {
			t.Errorf("%s: %v, want ErrNoCert", path, err)
		}
	}
	for _, path := range []string{"/error.pem", "/slow.pem"} {
		if _, err := fetch(ctx, srv.URL+path); err == nil || errors.Is(err, sesfeedback.ErrNoCert) {
			t.Errorf("%s: %v, want a failure to try again", path, err)
		}
	}
	// The client's own TLS verification applies: a server it does not trust gives nothing.
	if _, err := sesfeedback.HTTPSFetch(nil)(ctx, srv.URL+"/cert.pem"); err == nil {
		t.Error("fetched from a server with an untrusted certificate")
	}
}

// The fixed notifications of FuzzVerify: signed by snstest (-write-sns-fixtures makes
// them again, with a new key), with the certificate beside them; the key is not kept.
var (
	writeFixtures = flag.Bool("write-sns-fixtures", false, "write testdata/sns anew")
	fixedAt       = time.Date(2026, 12, 1, 10, 0, 2, 500e6, time.UTC)
	fixedNames    = []string{"v1", "v2", "v1-subject", "v2-subject"}
)

// fixed is the verifier of the fixed notifications, and the notifications.
func fixed(t testing.TB) (*sesfeedback.Verifier, map[string][]byte) {
	t.Helper()
	dir := filepath.Join("testdata", "sns")
	if *writeFixtures {
		topic := snstest.New(t, topicARN, snstest.Options{NotBefore: fixedAt.AddDate(-1, 0, 0), NotAfter: fixedAt.AddDate(10, 0, 0)})
		subject := "Amazon SES Email Event Notification"
		files := map[string][]byte{"cert.pem": topic.CertPEM}
		for i, name := range fixedNames {
			n := topic.Publish(fmt.Sprintf("5f1e2d3c-0000-5000-8000-00000000000%d", i), deliveryRecord(t), fixedAt, name[1:2])
			if strings.HasSuffix(name, "-subject") {
				n.Subject = &subject
				topic.Sign(&n)
			}
			files[name+".json"] = []byte(n.JSON() + "\n")
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	cert := read("cert.pem")
	v := verifier(t, func(_ context.Context, url string) ([]byte, error) {
		if url == snstest.CertURL {
			return cert, nil
		}
		return nil, sesfeedback.ErrNoCert
	})
	bodies := map[string][]byte{}
	for _, name := range fixedNames {
		bodies[name] = read(name + ".json")
	}
	return v, bodies
}

// TestFixedNotificationsVerify: the fuzz target's seeds verify with the fixed certificate
// a minute after they were signed, and are stale fifteen days after.
func TestFixedNotificationsVerify(t *testing.T) {
	v, bodies := fixed(t)
	for name, body := range bodies {
		if err := v.Verify(context.Background(), body, fixedAt.Add(time.Minute)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		assertRefused(t, v.Verify(context.Background(), body, fixedAt.Add(15*24*time.Hour)), sesfeedback.ReasonStale)
	}
}

// FuzzVerify: no body makes Verify panic, every refusal is typed, and whatever it takes
// carries exactly the signed fields of one of the fixed notifications. The notifications
// and the certificate are fixed (testdata/sns): making a key in every fuzz worker costs
// more than the fuzzing.
func FuzzVerify(f *testing.F) {
	v, bodies := fixed(f)
	now := fixedAt.Add(time.Minute)
	type signed struct{ Message, MessageID, Subject, Timestamp, TopicArn, Type string }
	key := func(n snstest.Notification) signed {
		s := "<none>"
		if n.Subject != nil {
			s = *n.Subject
		}
		return signed{n.Message, n.MessageID, s, n.Timestamp, n.TopicArn, n.Type}
	}
	genuine := map[signed]bool{}
	for _, body := range bodies {
		var n snstest.Notification
		if err := json.Unmarshal(body, &n); err != nil {
			f.Fatal(err)
		}
		genuine[key(n)] = true
		f.Add(body)
	}
	f.Add([]byte(deliveryRecord(f)))
	f.Add([]byte(`{"Type":"Notification","TopicArn":"` + topicARN + `","SigningCertURL":"https://sns.eu-west-1.amazonaws.com/a.pem","Signature":"AA==","SignatureVersion":"2","MessageId":"m","Message":"x","Timestamp":"2026-12-01T10:00:00Z"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		err := v.Verify(context.Background(), body, now)
		if err != nil {
			var e *sesfeedback.Error
			if !errors.As(err, &e) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		var n snstest.Notification
		if err := json.Unmarshal(body, &n); err != nil {
			t.Fatalf("took a body that is not an envelope: %v", err)
		}
		if !genuine[key(n)] {
			t.Fatalf("took a notification nobody signed: %+v", key(n))
		}
	})
}
