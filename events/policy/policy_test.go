package policy_test

import (
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events/policy"
)

const sample = `
defaults:
  ttl: 4m
  rate_limits:
    ip_per_minute: 50
tenants:
  acme:
    code_length: 8
    alphabet: "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    max_attempts: 3
    purposes: [login, signup]
    sender: "Acme <no-reply@acme.example>"
    locale: de
    rate_limits:
      tenant_per_minute: 1000
    test_recipients:
      qa@acme.test: "AAAA2222"
  beta: {}
`

func TestParse(t *testing.T) {
	s, err := policy.Parse([]byte(sample))
	if err != nil {
		t.Fatal(err)
	}
	acme := s.For("acme")
	if acme.CodeLength != 8 || acme.MaxAttempts != 3 || acme.TTL != 4*time.Minute || acme.Locale != "de" ||
		acme.RateLimits.IPPerMinute != 50 || acme.RateLimits.TenantPerMinute != 1000 || acme.RateLimits.RecipientPerHour != 5 {
		t.Fatalf("acme = %+v", acme)
	}
	if !acme.AllowsPurpose("login") || acme.AllowsPurpose("payment") {
		t.Fatal("purposes not applied")
	}
	if code, ok := acme.TestCode("QA@acme.test"); !ok || code != "AAAA2222" {
		t.Fatalf("test recipient: %q %v", code, ok)
	}
	beta := s.For("beta")
	if beta.CodeLength != 6 || beta.TTL != 4*time.Minute || !beta.AllowsPurpose("anything") {
		t.Fatalf("beta = %+v", beta)
	}
	if _, ok := beta.TestCode("qa@acme.test"); ok {
		t.Fatal("a test recipient leaked to another tenant")
	}
	if unknown := s.For("unknown"); unknown.TTL != 4*time.Minute || unknown.MaxAttempts != 5 {
		t.Fatalf("unknown tenant = %+v, want the defaults", unknown)
	}
	empty, err := policy.Parse(nil)
	if err != nil || empty.For("x").CodeLength != 6 {
		t.Fatalf("empty file: %v", err)
	}
}

func TestParseRefusesMalformed(t *testing.T) {
	for name, doc := range map[string]string{
		"not yaml":           "tenants: [",
		"unknown key":        "defaults:\n  ttl_minutes: 5\n",
		"unknown tenant key": "tenants:\n  acme:\n    colour: red\n",
		"bad tenant name":    "tenants:\n  \"ac me\": {}\n",
		"short code":         "tenants:\n  acme:\n    code_length: 3\n",
		"repeated alphabet":  "tenants:\n  acme:\n    alphabet: \"aab\"\n",
		"ttl over max":       "tenants:\n  acme:\n    ttl: 20m\n",
		"max_ttl too long":   "defaults:\n  max_ttl: 2h\n",
		"bad duration":       "defaults:\n  ttl: soon\n",
		"bad sender":         "tenants:\n  acme:\n    sender: \"not an address\"\n",
		"bad purpose":        "tenants:\n  acme:\n    purposes: [Login]\n",
		"bad test code":      "tenants:\n  acme:\n    test_recipients:\n      qa@acme.test: \"12\"\n",
		"bad test address":   "tenants:\n  acme:\n    test_recipients:\n      qa: \"123456\"\n",
		"missing templates":  "tenants:\n  acme:\n    template_dir: /does/not/exist\n",
		"negative limit":     "defaults:\n  rate_limits:\n    ip_per_minute: -1\n",
	} {
		if _, err := policy.Parse([]byte(doc)); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !strings.HasPrefix(err.Error(), "tenants file") {
			t.Errorf("%s: error %q does not say where", name, err)
		}
	}
}
