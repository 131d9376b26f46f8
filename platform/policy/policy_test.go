package policy_test

import (
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/platform/policy"
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
    service_name: "Acme Shop"
    code_in_subject: true
    purpose_text:
      en: {login: "sign in to the shop", "*": "approve this step"}
      de: {login: "zum Anmelden im Shop"}
  beta: {}
  gamma:
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
	// Test recipients match in canonical form (events.CanonicalAddress), as every other
	// recipient key does.
	for _, addr := range []string{"qa@acme.test", "QA@Acme.TEST", " qa@acme.test\t"} {
		if code, ok := acme.TestCode(addr); !ok || code != "AAAA2222" {
			t.Fatalf("test recipient %q: %q %v", addr, code, ok)
		}
	}
	if acme.ServiceName != "Acme Shop" || !acme.CodeInSubject || acme.PurposeText["en"]["login"] != "sign in to the shop" ||
		acme.PurposeText["en"][policy.AnyPurpose] != "approve this step" || acme.PurposeText["de"]["login"] != "zum Anmelden im Shop" {
		t.Fatalf("mail words of acme: %q %v %v", acme.ServiceName, acme.CodeInSubject, acme.PurposeText)
	}
	beta := s.For("beta")
	if beta.CodeLength != 6 || beta.TTL != 4*time.Minute || !beta.AllowsPurpose("anything") {
		t.Fatalf("beta = %+v", beta)
	}
	// The mail words default to nothing set: the tenant id, the built-in wording, no code
	// in the subject.
	if beta.ServiceName != "" || beta.CodeInSubject || beta.PurposeText != nil || policy.Default().CodeInSubject {
		t.Fatalf("beta mail words: %q %v %v", beta.ServiceName, beta.CodeInSubject, beta.PurposeText)
	}
	if _, ok := beta.TestCode("qa@acme.test"); ok {
		t.Fatal("a test recipient leaked to another tenant")
	}
	if gamma := s.For("gamma"); gamma.CodeLength != 6 || gamma.TTL != 4*time.Minute {
		t.Fatalf("gamma (no keys) = %+v", gamma)
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
		"not yaml":                          "tenants: [",
		"unknown key":                       "defaults:\n  ttl_minutes: 5\n",
		"unknown tenant key":                "tenants:\n  acme:\n    colour: red\n",
		"bad tenant name":                   "tenants:\n  \"ac me\": {}\n",
		"short code":                        "tenants:\n  acme:\n    code_length: 3\n",
		"repeated alphabet":                 "tenants:\n  acme:\n    alphabet: \"aab\"\n",
		"ttl over max":                      "tenants:\n  acme:\n    ttl: 20m\n",
		"max_ttl too long":                  "defaults:\n  max_ttl: 2h\n",
		"bad duration":                      "defaults:\n  ttl: soon\n",
		"bad sender":                        "tenants:\n  acme:\n    sender: \"not an address\"\n",
		"bad purpose":                       "tenants:\n  acme:\n    purposes: [Login]\n",
		"test code too short":               "tenants:\n  acme:\n    test_recipients:\n      qa@acme.test: \"12\"\n",
		"test code too long":                "tenants:\n  acme:\n    test_recipients:\n      qa@acme.test: \"1234567\"\n",
		"test code alphabet":                "tenants:\n  acme:\n    test_recipients:\n      qa@acme.test: \"12345a\"\n",
		"test code alphabet of the tenant":  "tenants:\n  acme:\n    code_length: 4\n    alphabet: \"ABCD\"\n    test_recipients:\n      qa@acme.test: \"ABC1\"\n",
		"same test recipient twice":         "tenants:\n  acme:\n    test_recipients:\n      qa@acme.test: \"123456\"\n      QA@Acme.test: \"654321\"\n",
		"service name with a line break":    "tenants:\n  acme:\n    service_name: \"Acme\\r\\nBcc: evil@example.com\"\n",
		"service name with a tab":           "tenants:\n  acme:\n    service_name: \"Acme\\tShop\"\n",
		"service name with a bidi override": "tenants:\n  acme:\n    service_name: \"Acme \\u202Epohs\"\n",
		"service name with a template":      "tenants:\n  acme:\n    service_name: \"{{.Code}}\"\n",
		"service name with markup":          "tenants:\n  acme:\n    service_name: \"<b>Acme</b>\"\n",
		"service name too long":             "tenants:\n  acme:\n    service_name: \"" + strings.Repeat("a", policy.MaxServiceName+1) + "\"\n",
		"service name with spaces around":   "tenants:\n  acme:\n    service_name: \" Acme\"\n",
		"purpose text for a bad locale":     "tenants:\n  acme:\n    purpose_text:\n      english: {login: sign in}\n",
		"purpose text for a bad purpose":    "tenants:\n  acme:\n    purpose_text:\n      en: {Login: sign in}\n",
		"empty purpose text":                "tenants:\n  acme:\n    purpose_text:\n      en: {login: \"\"}\n",
		"purpose text with a line break":    "defaults:\n  purpose_text:\n    en: {login: \"sign in\\nSubject: x\"}\n",
		"purpose text with a template":      "defaults:\n  purpose_text:\n    en: {\"*\": \"{{template \\\"x\\\"}}\"}\n",
		"purpose text too long":             "defaults:\n  purpose_text:\n    en: {login: \"" + strings.Repeat("a", policy.MaxPurposeText+1) + "\"}\n",
		"code_in_subject not a bool":        "tenants:\n  acme:\n    code_in_subject: sometimes\n",
		"bad test address":                  "tenants:\n  acme:\n    test_recipients:\n      qa: \"123456\"\n",
		"missing templates":                 "tenants:\n  acme:\n    template_dir: /does/not/exist\n",
		"negative limit":                    "defaults:\n  rate_limits:\n    ip_per_minute: -1\n",
		"negative suppression expiry":       "tenants:\n  acme:\n    suppression:\n      expiry: -1h\n",
		"unknown suppression key":           "tenants:\n  acme:\n    suppression:\n      off: true\n",
	} {
		if _, err := policy.Parse([]byte(doc)); err == nil {
			t.Errorf("%s: accepted", name)
		} else if testing.Verbose() {
			t.Logf("%s: %v", name, err)
		} else if !strings.HasPrefix(err.Error(), "tenants file") {
			t.Errorf("%s: error %q does not say where", name, err)
		}
	}
}

// TestSuppressionPolicy: suppression is on, with entries kept for ever, unless a tenant
// turns it off or sets an expiry; one tenant's setting is not another's.
func TestSuppressionPolicy(t *testing.T) {
	s, err := policy.Parse([]byte("tenants:\n  acme:\n    suppression:\n      expiry: 720h\n  beta:\n    suppression:\n      disabled: true\n  gamma: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p := s.For("acme").Suppression; p.Disabled || p.Expiry != 720*time.Hour {
		t.Errorf("acme suppression %+v", p)
	}
	if p := s.For("beta").Suppression; !p.Disabled || p.Expiry != 0 {
		t.Errorf("beta suppression %+v", p)
	}
	if p := s.For("gamma").Suppression; p.Disabled || p.Expiry != 0 {
		t.Errorf("gamma suppression %+v, want the default: on, for ever", p)
	}
}

// TestPurposeTextMergesPerLocale: a tenant's purpose_text replaces the defaults' entry
// for the locales it names and keeps the others, without changing the defaults.
func TestPurposeTextMergesPerLocale(t *testing.T) {
	s, err := policy.Parse([]byte(`
defaults:
  purpose_text:
    en: {login: "sign in", signup: "join"}
    de: {login: "zum Anmelden"}
tenants:
  acme:
    purpose_text:
      en: {signup: "open your Acme account"}
  beta: {}
  gamma:
`))
	if err != nil {
		t.Fatal(err)
	}
	acme, beta := s.For("acme").PurposeText, s.For("beta").PurposeText
	if len(acme["en"]) != 1 || acme["en"]["signup"] != "open your Acme account" || acme["de"]["login"] != "zum Anmelden" {
		t.Fatalf("acme: %v", acme)
	}
	if len(beta["en"]) != 2 || beta["en"]["signup"] != "join" || s.For("unknown").PurposeText["en"]["signup"] != "join" {
		t.Fatalf("beta: %v, defaults changed by another tenant?", beta)
	}
}
