package mailer_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

// rcptError is a provider's own error type that quotes the recipient.
type rcptError struct{ rcpt string }

func (e *rcptError) Error() string {
	return "550 5.1.1 <" + e.rcpt + ">: Recipient address rejected, affected recipient(s): " + e.rcpt
}

// quoting answers every send with err(m.To).
type quoting struct {
	name string
	err  func(rcpt string) error
}

func (q *quoting) Name() string { return q.name }
func (q *quoting) Send(_ context.Context, m *mailer.Message) (mailer.Receipt, error) {
	return mailer.Receipt{}, q.err(m.To)
}

func TestSendErrorTextNamesNoAddress(t *testing.T) {
	err := error(&mailer.SendError{Provider: "smtp", Class: mailer.Permanent, Err: &rcptError{"ana@example.com"}})
	if got, want := err.Error(), "smtp: permanent: 550 5.1.1 <address>: Recipient address rejected, affected recipient(s): <address>"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
	var re *rcptError
	if !errors.As(err, &re) || re.rcpt != "ana@example.com" || mailer.ClassOf(fmt.Errorf("send: %w", err)) != mailer.Permanent {
		t.Fatal("the provider's error and the class are no longer reachable")
	}
	if got := (&mailer.SendError{Provider: "chain", Class: mailer.ProviderDown}).Error(); got != "chain: provider_down" {
		t.Fatalf("without Err: %q", got)
	}
}

// TestChainAndGuardErrorsNameNoAddress covers providers that break the contract: an
// unclassified error, and a SendError inside a wrapper whose own text quotes the address.
func TestChainAndGuardErrorsNameNoAddress(t *testing.T) {
	const rcpt = "ana.müller+otp@example.com"
	tests := []struct {
		name  string
		err   func(rcpt string) error
		class mailer.Class
	}{
		{"unclassified", func(r string) error { return &rcptError{r} }, mailer.Transient},
		{"SendError", func(r string) error {
			return &mailer.SendError{Provider: "p", Class: mailer.Permanent, Err: &rcptError{r}}
		}, mailer.Permanent},
		{"wrapped SendError", func(r string) error {
			return fmt.Errorf("send to %s: %w", r, &mailer.SendError{Provider: "p", Class: mailer.Permanent, Err: &rcptError{r}})
		}, mailer.Permanent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := &quoting{name: "p", err: tt.err}
			for _, via := range []mailer.Provider{p, mailer.NewGuard(p, mailer.GuardConfig{RetryInitial: time.Millisecond})} {
				_, err := (&mailer.Chain{Providers: []mailer.Provider{via}}).Send(context.Background(), &mailer.Message{To: rcpt})
				if err == nil || mailer.ClassOf(err) != tt.class {
					t.Fatalf("err %v, want class %s", err, tt.class)
				}
				var re *rcptError
				if !errors.As(err, &re) {
					t.Fatalf("%v: the provider's error is no longer reachable", err)
				}
				texts := []string{err.Error(), fmt.Sprint(err), fmt.Sprintf("%+v", err)}
				for _, text := range texts {
					if strings.Contains(text, "@") || !strings.Contains(text, "<address>") {
						t.Fatalf("error text %q names the recipient", text)
					}
				}
			}
		})
	}
}
