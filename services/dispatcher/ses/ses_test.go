package ses_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/sesv2/types"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/ses"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
)

func provider(t *testing.T, endpoint string, timeout time.Duration) *ses.Provider {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	cfg := ses.Config{Region: "eu-west-1", Endpoint: endpoint, ConfigurationSet: "otp", Timeout: timeout}
	client, err := ses.NewClient(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return ses.New(client, cfg)
}

func message() *mailer.Message {
	return &mailer.Message{From: "Acme <no-reply@acme.example>", To: "ana@example.com", Subject: "Your verification code: 493027",
		Text: "code 493027", HTML: "<p>493027</p>", Headers: map[string]string{"X-Otp-Challenge-Id": "c-1"},
		Tags: map[string]string{"tenant": "acme", "purpose": "login.v2", "challenge_id": "2eedf1ad-5135-4c42-a28f-5b09316ec196"}}
}

func TestSendReachesSESWithTagsAndHeaders(t *testing.T) {
	srv := sestest.New(t)
	p := provider(t, srv.URL, 2*time.Second)
	rcpt, err := p.Send(context.Background(), message())
	if err != nil {
		t.Fatal(err)
	}
	got := srv.Emails()
	if len(got) != 1 || rcpt.MessageID != got[0].MessageID {
		t.Fatalf("receipt %q, emails %+v", rcpt.MessageID, got)
	}
	e := got[0]
	if e.From != "Acme <no-reply@acme.example>" || e.To[0] != "ana@example.com" || e.Subject != "Your verification code: 493027" ||
		e.Text != "code 493027" || e.HTML != "<p>493027</p>" || e.ConfigSet != "otp" || e.Headers["X-Otp-Challenge-Id"] != "c-1" {
		t.Fatalf("email = %+v", e)
	}
	want := map[string]string{"tenant": "acme", "purpose": "login_v2", "challenge_id": "2eedf1ad-5135-4c42-a28f-5b09316ec196"}
	for k, v := range want {
		if e.Tags[k] != v {
			t.Errorf("tag %s = %q, want %q (SES allows only [0-9A-Za-z_-])", k, e.Tags[k], v)
		}
	}
}

// TestClassification checks every answer SES can give, and the transport failures, map to
// the class whose action docs/delivery.md lists; and that the SDK itself never retries.
func TestClassification(t *testing.T) {
	tests := []struct {
		name  string
		fault sestest.Fault
		want  mailer.Class
	}{
		{"TooManyRequestsException", sestest.Throttled, mailer.Throttled},
		{"503", sestest.Unavailable, mailer.Transient},
		{"InternalServiceErrorException", sestest.InternalError, mailer.Transient},
		{"MessageRejected content", sestest.Rejected, mailer.Permanent},
		{"MessageRejected unverified identity", sestest.Unverified, mailer.ProviderDown},
		{"BadRequestException", sestest.BadRequest, mailer.Permanent},
		{"SendingPausedException", sestest.Paused, mailer.ProviderDown},
		{"AccountSuspendedException", sestest.Suspended, mailer.ProviderDown},
		{"MailFromDomainNotVerifiedException", sestest.MailFrom, mailer.ProviderDown},
		{"NotFoundException", sestest.NotFound, mailer.ProviderDown},
		{"LimitExceededException", sestest.LimitExceeded, mailer.QuotaExhausted},
		{"Throttling daily quota", sestest.DailyQuota, mailer.QuotaExhausted},
		{"AccessDeniedException", sestest.Denied, mailer.ProviderDown},
		{"reset after the request", sestest.Fault{Reset: true}, mailer.Ambiguous},
		{"accepted, then reset", sestest.Fault{AcceptThenReset: true}, mailer.Ambiguous},
		{"slow answer past the timeout", sestest.Fault{Delay: 2 * time.Second}, mailer.Ambiguous},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := sestest.New(t)
			srv.SetFault(sestest.Always(tt.fault))
			p := provider(t, srv.URL, 300*time.Millisecond)
			_, err := p.Send(context.Background(), message())
			var se *mailer.SendError
			if !errors.As(err, &se) || se.Class != tt.want || se.Provider != "ses" {
				t.Fatalf("err = %v, want class %s", err, tt.want)
			}
			if n := srv.Calls(); n != 1 {
				t.Fatalf("%d calls: the SDK retried on its own", n)
			}
		})
	}
}

func TestClassificationWithoutAnAnswer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + ln.Addr().String()
	ln.Close()

	cases := []struct {
		name     string
		endpoint string
		ctx      func() (context.Context, context.CancelFunc)
		want     mailer.Class
	}{
		{"connection refused", closed, nil, mailer.ProviderDown},
		{"DNS failure", "http://ses.does-not-exist.invalid", nil, mailer.ProviderDown},
		{"context already expired", closed, func() (context.Context, context.CancelFunc) {
			return context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
		}, mailer.Transient},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.Background(), context.CancelFunc(func() {})
			if tc.ctx != nil {
				ctx, cancel = tc.ctx()
			}
			defer cancel()
			_, err := provider(t, tc.endpoint, time.Second).Send(ctx, message())
			if c := mailer.ClassOf(err); c != tc.want || err == nil {
				t.Fatalf("err = %v (class %s), want %s", err, c, tc.want)
			}
		})
	}

	// A deadline that expires while SES is answering: the request was handed over.
	srv := sestest.New(t)
	srv.SetFault(sestest.Always(sestest.Fault{Delay: time.Second}))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := provider(t, srv.URL, 5*time.Second).Send(ctx, message()); mailer.ClassOf(err) != mailer.Ambiguous {
		t.Fatalf("deadline during the answer: %v, want ambiguous", err)
	}
}

func TestMaxSendRateFromGetAccount(t *testing.T) {
	srv := sestest.New(t)
	srv.SetSendRate(42)
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	client, err := ses.NewClient(context.Background(), ses.Config{Region: "eu-west-1", Endpoint: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := ses.MaxSendRate(context.Background(), client); err != nil || r != 42 {
		t.Fatalf("rate %v, %v", r, err)
	}
}

// TestErrorTextNamesNoRecipient: SES names the recipient in some refusals; the error's
// text must not, while the class and the SDK's error stay as they were.
func TestErrorTextNamesNoRecipient(t *testing.T) {
	const rcpt = "ana.müller+otp@example.com"
	rejected := func(_ int64, e sestest.Email) sestest.Fault {
		f := sestest.Rejected
		f.Message = "Email address is on the account-level suppression list: " + e.To[0]
		return f
	}
	tests := []struct {
		name  string
		fault func(int64, sestest.Email) sestest.Fault
		want  mailer.Class
	}{
		{"sandbox: recipient not verified", sestest.NotVerified, mailer.ProviderDown},
		{"recipient refused", rejected, mailer.Permanent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := sestest.New(t)
			srv.SetFault(tt.fault)
			m := message()
			m.To = rcpt
			_, err := provider(t, srv.URL, time.Second).Send(context.Background(), m)
			if c := mailer.ClassOf(err); c != tt.want {
				t.Fatalf("err = %v (class %s), want %s", err, c, tt.want)
			}
			var mr *types.MessageRejected
			if !errors.As(err, &mr) || !strings.Contains(mr.ErrorMessage(), rcpt) {
				t.Fatalf("the SDK's MessageRejected is no longer reachable from %v", err)
			}
			text := err.Error()
			if strings.Contains(text, "@") || strings.Contains(text, "ana.m") || !strings.Contains(text, "MessageRejected") {
				t.Fatalf("error text %q names the recipient or lost SES's answer", text)
			}
		})
	}
}
