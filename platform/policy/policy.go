// Package policy is the per-tenant policy of OTP_TENANTS_FILE: code shape, lifetimes,
// attempts, purposes, sender, mail wording and templates, rate limits, risk rules and test
// recipients.
// Tenants the file does not name get the defaults. The file format is part of the
// contract (see README); a malformed file stops every service that reads it.
package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/mail"
	"os"
	"regexp"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/otpflow/otpflow/events"
	"go.yaml.in/yaml/v3"
)

// Policy is what one tenant gets.
type Policy struct {
	CodeLength     int           `yaml:"code_length"`
	Alphabet       string        `yaml:"alphabet"`
	TTL            time.Duration `yaml:"ttl"`
	MaxTTL         time.Duration `yaml:"max_ttl"`
	MaxAttempts    int           `yaml:"max_attempts"`
	Purposes       []string      `yaml:"purposes"` // empty: any purpose
	Sender         string        `yaml:"sender"`   // empty: OTP_MAIL_FROM
	Locale         string        `yaml:"locale"`   // default locale of the mails
	TemplateDir    string        `yaml:"template_dir"`
	ResendCooldown time.Duration `yaml:"resend_cooldown"`
	MaxSends       int           `yaml:"max_sends"`    // codes per challenge
	RecentCodes    int           `yaml:"recent_codes"` // newest codes of a challenge that verify
	RateLimits     RateLimits    `yaml:"rate_limits"`
	Risk           Risk          `yaml:"risk"`
	// TestRecipients get a fixed code and no mail, so apps can run their own end-to-end
	// tests; every event about them says test: true.
	TestRecipients map[string]string `yaml:"test_recipients"`

	// ServiceName is how every mail names the service the code is for ("Acme: your code
	// to sign in"); empty: the tenant id. Plain text: no control characters, no braces or
	// angle brackets, at most MaxServiceName characters.
	ServiceName string `yaml:"service_name"`
	// PurposeText words a purpose per locale, over the built-in wording: locale -> purpose
	// -> phrase, "*" for any purpose the map does not name. The phrase completes the
	// template's sentence: in en "Here is your Acme code to <phrase>" ("sign in"), in de
	// "Hier ist Ihr Bestätigungscode <phrase> bei Acme" ("zum Anmelden"). A tenant's entry
	// for a locale replaces the defaults' entry for that locale.
	PurposeText map[string]map[string]string `yaml:"purpose_text"`
	// CodeInSubject lets the subject carry the code. Off by default: subjects show on lock
	// screens, in notification previews and in provider event logs.
	CodeInSubject bool `yaml:"code_in_subject"`
	// Suppression keeps codes from recipients whose mail bounced for good or who
	// complained.
	Suppression Suppression `yaml:"suppression"`
}

// Suppression is the tenant's use of the suppression list: a permanent bounce or a
// complaint (otp.feedback) lists the recipient, and a request for a listed recipient is
// refused with reason suppressed.
type Suppression struct {
	// Disabled lists nobody from feedback and refuses nobody, the operator's entries
	// included; they are kept, and count again once it is turned back on.
	Disabled bool `yaml:"disabled"`
	// Expiry lifts an entry made from feedback this long after the bounce or the
	// complaint; zero (the default) keeps it until an operator removes it.
	Expiry time.Duration `yaml:"expiry"`
}

// RateLimits hold across issuer replicas (their state is in PostgreSQL). Zero turns one off.
type RateLimits struct {
	RecipientCooldown        time.Duration `yaml:"recipient_cooldown"`          // per (tenant, recipient, purpose)
	RecipientPerHour         int           `yaml:"recipient_per_hour"`          // per (tenant, recipient, purpose)
	IPPerMinute              int           `yaml:"ip_per_minute"`               // per client IP, when context.ip is given
	TenantPerMinute          int           `yaml:"tenant_per_minute"`           // off by default
	RecipientFailuresPerHour int           `yaml:"recipient_failures_per_hour"` // failed verifications across challenges
}

// Risk are the adaptive rules (docs/security.md). A zero threshold turns a rule off.
type Risk struct {
	// IPFanout refuses a request when one IP asked for codes for this many distinct
	// recipients within the window.
	IPFanout struct {
		Recipients int           `yaml:"recipients"`
		Window     time.Duration `yaml:"window"`
	} `yaml:"ip_fanout"`
	// RecipientBurst: this many new challenges for one recipient within the window gets
	// the next ones a shorter lifetime and fewer attempts.
	RecipientBurst struct {
		Challenges  int           `yaml:"challenges"`
		Window      time.Duration `yaml:"window"`
		TTL         time.Duration `yaml:"ttl"`
		MaxAttempts int           `yaml:"max_attempts"`
	} `yaml:"recipient_burst"`
	// RecipientFailures: after this many failed verifications for one recipient within
	// the window, a challenge allows at most MaxAttempts attempts.
	RecipientFailures struct {
		Failures    int           `yaml:"failures"`
		Window      time.Duration `yaml:"window"`
		MaxAttempts int           `yaml:"max_attempts"`
	} `yaml:"recipient_failures"`
}

// Default is the policy of a tenant that no file names.
func Default() Policy {
	p := Policy{
		CodeLength: 6, Alphabet: "0123456789", TTL: 5 * time.Minute, MaxTTL: 10 * time.Minute,
		MaxAttempts: 5, Locale: "en", ResendCooldown: 30 * time.Second, MaxSends: 5, RecentCodes: 3,
		RateLimits: RateLimits{RecipientCooldown: 30 * time.Second, RecipientPerHour: 5, IPPerMinute: 20,
			RecipientFailuresPerHour: 10},
	}
	p.Risk.IPFanout.Recipients, p.Risk.IPFanout.Window = 10, 10*time.Minute
	p.Risk.RecipientBurst.Challenges, p.Risk.RecipientBurst.Window = 3, 10*time.Minute
	p.Risk.RecipientBurst.TTL, p.Risk.RecipientBurst.MaxAttempts = 2*time.Minute, 3
	p.Risk.RecipientFailures.Failures, p.Risk.RecipientFailures.Window, p.Risk.RecipientFailures.MaxAttempts = 3, time.Hour, 3
	return p
}

// Set is the policies of every tenant.
type Set struct {
	defaults Policy
	tenants  map[string]Policy
}

// For returns tenant's policy.
func (s *Set) For(tenant string) Policy {
	if s == nil {
		return Default()
	}
	if p, ok := s.tenants[tenant]; ok {
		return p
	}
	return s.defaults
}

// Tenants lists the tenants the file names.
func (s *Set) Tenants() []string {
	var out []string
	for t := range s.tenants {
		out = append(out, t)
	}
	return out
}

// Defaults returns a Set where every tenant gets Default().
func Defaults() *Set { return &Set{defaults: Default(), tenants: map[string]Policy{}} }

type file struct {
	Defaults yaml.Node            `yaml:"defaults"`
	Tenants  map[string]yaml.Node `yaml:"tenants"`
}

// Load reads OTP_TENANTS_FILE; an empty path gives the defaults.
func Load(path string) (*Set, error) {
	if path == "" {
		return Defaults(), nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(b)
}

// Parse reads a policy file: "defaults" override the built-in defaults, and each entry
// of "tenants" overrides the defaults field by field. Unknown keys are errors.
func Parse(b []byte) (*Set, error) {
	var f file
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("tenants file: %w", err)
	}
	s := &Set{defaults: Default(), tenants: map[string]Policy{}}
	if !f.Defaults.IsZero() {
		if err := decodeStrict(&f.Defaults, &s.defaults); err != nil {
			return nil, fmt.Errorf("tenants file: defaults: %w", err)
		}
	}
	if err := s.defaults.Validate(); err != nil {
		return nil, fmt.Errorf("tenants file: defaults: %w", err)
	}
	for name, node := range f.Tenants {
		if !events.ValidTenant(name) {
			return nil, fmt.Errorf("tenants file: %q is not a tenant name (1-64 of [A-Za-z0-9_-])", name)
		}
		p := s.defaults
		p.Purposes = append([]string(nil), p.Purposes...)
		p.TestRecipients = nil
		p.PurposeText = copyWords(s.defaults.PurposeText) // the decoder writes into the map it finds
		if err := decodeStrict(&node, &p); err != nil {
			return nil, fmt.Errorf("tenants file: tenant %s: %w", name, err)
		}
		if err := p.Validate(); err != nil {
			return nil, fmt.Errorf("tenants file: tenant %s: %w", name, err)
		}
		s.tenants[name] = p
	}
	return s, nil
}

// decodeStrict decodes node onto v (fields not in node keep their values), refusing
// unknown keys. Errors name the line in the file and fit on one line.
func decodeStrict(node *yaml.Node, v any) error {
	if node.Kind == yaml.ScalarNode && node.Tag == "!!null" {
		return nil // "acme:" with nothing under it: the defaults
	}
	b, err := yaml.Marshal(node)
	if err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		msg := lineRef.ReplaceAllStringFunc(err.Error(), func(m string) string {
			var n int
			fmt.Sscanf(m, "line %d", &n)
			return fmt.Sprintf("line %d", n+node.Line-1)
		})
		msg = strings.ReplaceAll(strings.TrimPrefix(msg, "yaml: unmarshal errors:\n"), "\n", ";")
		return errors.New(strings.Join(strings.Fields(msg), " "))
	}
	return nil
}

var lineRef = regexp.MustCompile(`line \d+`)

var (
	purposePattern = regexp.MustCompile(`^[a-z0-9_.-]{1,32}$`)
	localePattern  = regexp.MustCompile(`^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$`)
)

// Bounds of the words a tenant puts into its mails.
const (
	MaxServiceName = 64
	MaxPurposeText = 80
	// AnyPurpose is the purpose_text key of the wording for purposes the map does not name.
	AnyPurpose = "*"
)

// Validate checks a policy's values.
func (p *Policy) Validate() error {
	switch {
	case p.CodeLength < 4 || p.CodeLength > 12:
		return errors.New("code_length must be 4 to 12")
	case utf8.RuneCountInString(p.Alphabet) < 2 || utf8.RuneCountInString(p.Alphabet) > 64 || !uniqueVisible(p.Alphabet):
		return errors.New("alphabet must be 2 to 64 distinct visible characters")
	case p.TTL < 30*time.Second:
		return errors.New("ttl must be at least 30s")
	case p.MaxTTL < p.TTL || p.MaxTTL > events.MaxCodeTTL:
		return fmt.Errorf("max_ttl must be between ttl and %v", events.MaxCodeTTL)
	case p.MaxAttempts < 1 || p.MaxAttempts > 20:
		return errors.New("max_attempts must be 1 to 20")
	case p.MaxSends < 1 || p.MaxSends > 20:
		return errors.New("max_sends must be 1 to 20")
	case p.RecentCodes < 1 || p.RecentCodes > p.MaxSends:
		return errors.New("recent_codes must be 1 to max_sends")
	case p.ResendCooldown < 0 || p.RateLimits.RecipientCooldown < 0:
		return errors.New("cooldowns must not be negative")
	case p.RateLimits.RecipientPerHour < 0 || p.RateLimits.IPPerMinute < 0 || p.RateLimits.TenantPerMinute < 0 || p.RateLimits.RecipientFailuresPerHour < 0:
		return errors.New("rate limits must not be negative")
	case p.Suppression.Expiry < 0:
		return errors.New("suppression.expiry must not be negative")
	case p.Locale != "" && !localePattern.MatchString(p.Locale):
		return errors.New("locale must be a language tag such as en or pt-BR")
	}
	for _, pu := range p.Purposes {
		if !purposePattern.MatchString(pu) {
			return fmt.Errorf("purpose %q must be 1-32 of [a-z0-9_.-]", pu)
		}
	}
	if p.Sender != "" {
		if _, err := mail.ParseAddress(p.Sender); err != nil || strings.ContainsAny(p.Sender, "\r\n") {
			return errors.New("sender must be an address such as Acme <no-reply@acme.example>")
		}
	}
	if p.ServiceName != "" {
		if err := mailText(p.ServiceName, MaxServiceName); err != nil {
			return fmt.Errorf("service_name %v", err)
		}
	}
	for locale, words := range p.PurposeText {
		if !localePattern.MatchString(locale) {
			return fmt.Errorf("purpose_text: %q must be a language tag such as en or pt-BR", locale)
		}
		for purpose, text := range words {
			if purpose != AnyPurpose && !purposePattern.MatchString(purpose) {
				return fmt.Errorf("purpose_text %s: purpose %q must be 1-32 of [a-z0-9_.-] or %q", locale, purpose, AnyPurpose)
			}
			if err := mailText(text, MaxPurposeText); err != nil {
				return fmt.Errorf("purpose_text %s.%s %v", locale, purpose, err)
			}
		}
	}
	if p.TemplateDir != "" {
		if st, err := os.Stat(p.TemplateDir); err != nil || !st.IsDir() {
			return fmt.Errorf("template_dir %s is not a directory", p.TemplateDir)
		}
	}
	r := p.Risk
	if r.IPFanout.Recipients > 0 && r.IPFanout.Window <= 0 || r.RecipientBurst.Challenges > 0 && (r.RecipientBurst.Window <= 0 || r.RecipientBurst.TTL < 30*time.Second || r.RecipientBurst.MaxAttempts < 1) ||
		r.RecipientFailures.Failures > 0 && (r.RecipientFailures.Window <= 0 || r.RecipientFailures.MaxAttempts < 1) {
		return errors.New("risk: every rule with a threshold needs a window (and a ttl of at least 30s and max_attempts of at least 1 where it has them)")
	}
	seen := map[string]string{}
	for addr, code := range p.TestRecipients {
		if err := events.ValidateAddress(addr); err != nil {
			return fmt.Errorf("test recipient %q: %v", addr, err)
		}
		// TestCode matches in canonical form, so two spellings of one address would make
		// its code depend on map order.
		if other, ok := seen[events.CanonicalAddress(addr)]; ok {
			return fmt.Errorf("test recipients %q and %q are the same address", min(addr, other), max(addr, other))
		}
		seen[events.CanonicalAddress(addr)] = addr
		if !p.IsCode(code) {
			return fmt.Errorf("test recipient %q: the code must be %d characters of the alphabet", addr, p.CodeLength)
		}
	}
	return nil
}

// IsCode reports whether s has the policy's length and alphabet.
func (p *Policy) IsCode(s string) bool {
	if utf8.RuneCountInString(s) != p.CodeLength {
		return false
	}
	for _, r := range s {
		if !strings.ContainsRune(p.Alphabet, r) {
			return false
		}
	}
	return true
}

// AllowsPurpose reports whether purpose may be requested.
func (p *Policy) AllowsPurpose(purpose string) bool {
	return len(p.Purposes) == 0 || contains(p.Purposes, purpose)
}

// TestCode returns the fixed code of a test recipient, comparing addresses in their
// canonical form (events.CanonicalAddress), as every other recipient key is.
func (p *Policy) TestCode(recipient string) (string, bool) {
	want := events.CanonicalAddress(recipient)
	for addr, code := range p.TestRecipients {
		if events.CanonicalAddress(addr) == want {
			return code, true
		}
	}
	return "", false
}

// mailText checks words that templates put into a mail: 1 to max characters, no
// surrounding space, no control or invisible formatting character (a line break could
// reach a header; a bidi override can make a name read as another), and none of {}<>,
// which plain names do not need and which would read as markup or a template action
// wherever a part is not escaped.
func mailText(s string, max int) error {
	if s == "" || utf8.RuneCountInString(s) > max || !utf8.ValidString(s) || strings.TrimSpace(s) != s {
		return fmt.Errorf("must be 1 to %d characters without surrounding space", max)
	}
	for _, r := range s {
		if unicode.In(r, unicode.Cc, unicode.Cf, unicode.Zl, unicode.Zp) || strings.ContainsRune("{}<>", r) {
			return fmt.Errorf("must not contain %q (control characters and {}<> are refused)", r)
		}
	}
	return nil
}

func copyWords(m map[string]map[string]string) map[string]map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]map[string]string, len(m))
	for locale, words := range m {
		out[locale] = make(map[string]string, len(words))
		for k, v := range words {
			out[locale][k] = v
		}
	}
	return out
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

func uniqueVisible(s string) bool {
	seen := map[rune]bool{}
	for _, r := range s {
		if seen[r] || r <= ' ' || r == 0x7f {
			return false
		}
		seen[r] = true
	}
	return true
}
