package dispatcher

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

var update = flag.Bool("update", false, "rewrite testdata/golden from the templates")

// mustPolicies parses a tenants file.
func mustPolicies(tb testing.TB, doc string) *policy.Set {
	tb.Helper()
	s, err := policy.Parse([]byte(doc))
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// writeFiles writes files (path relative to root -> content) under root.
func writeFiles(tb testing.TB, root string, files map[string]string) {
	tb.Helper()
	for name, body := range files {
		path := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
}

const goldenPolicies = `
tenants:
  acme:
    service_name: "Acme"
  acme-subject:
    service_name: "Acme"
    code_in_subject: true
  acme-words:
    service_name: "Acme Shop"
    purpose_text:
      en: {login: "sign in to the shop", "*": "approve this step"}
`

// TestGoldenTemplates renders the built-in locales and compares whole mails (subject,
// text and HTML) with testdata/golden. Rewrite with go test -run TestGoldenTemplates -update.
func TestGoldenTemplates(t *testing.T) {
	tm, err := LoadTemplates("", mustPolicies(t, goldenPolicies))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		file, tenant, locale, purpose string
		minutes                       int
	}{
		{"en-1", "acme", "en", "login", 1},
		{"en-5", "acme", "en", "signup", 5},
		{"de-1", "acme", "de", "login", 1},
		{"de-5", "acme", "de", "reset_password", 5},
		{"en-other-purpose", "acme", "en", "payment", 5},
		{"de-other-purpose", "acme", "de", "payment", 5},
		{"en-code-in-subject", "acme-subject", "en", "verify_email", 5},
		{"de-code-in-subject", "acme-subject", "de", "verify_email", 5},
		{"en-tenant-id", "demo", "en", "step_up", 5},
		{"en-purpose-text", "acme-words", "en", "login", 5},
		// Fallbacks render exactly the file of the locale they fall back to.
		{"de-1", "acme", "de-AT", "login", 1},
		{"en-1", "acme", "pt-BR", "login", 1},
		{"en-1", "acme", "", "login", 1},
	} {
		subject, text, html, err := tm.Render(tc.tenant, tc.locale, TemplateData{Code: "493027", Minutes: tc.minutes, Purpose: tc.purpose, Tenant: tc.tenant})
		if err != nil {
			t.Fatal(err)
		}
		got := "Subject: " + subject + "\n\n" + text + "\n----\n" + html
		path := filepath.Join("testdata", "golden", tc.file+".txt")
		if *update && strings.HasPrefix(tc.file, tc.locale+"-") {
			if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: %v (run go test -run TestGoldenTemplates -update)", path, err)
		}
		if got != string(want) {
			t.Errorf("tenant %s, locale %q, purpose %s: rendering differs from %s:\n%s", tc.tenant, tc.locale, tc.purpose, path, got)
		}
		if !strings.Contains(text, "493027") || !strings.Contains(html, "493027") {
			t.Errorf("%s: a body lacks the code", tc.file)
		}
		if strings.Contains(subject, "493027") != (tc.tenant == "acme-subject") {
			t.Errorf("%s: subject %q shows the code against code_in_subject", tc.file, subject)
		}
	}
}

// TestEveryMailSaysWhatItIs: with the default policy, every built-in locale and every
// purpose, the mail names the service and the purpose in words, says the code is never
// asked for by phone, chat or mail, gives its lifetime and what to do if unasked, and
// keeps the code out of the subject.
func TestEveryMailSaysWhatItIs(t *testing.T) {
	tm, err := LoadTemplates("", nil)
	if err != nil {
		t.Fatal(err)
	}
	says := map[string][]string{
		"en": {"will never ask you for this code by phone, chat or email", "expires in 7 minutes", "Did not ask for this code?"},
		"de": {"niemals per Telefon, Chat oder E-Mail nach diesem Code fragen", "7 Minuten gültig", "nicht angefordert?"},
	}
	if len(says) != len(tm.builtin) {
		t.Fatalf("built-in locales %d, this test knows %d: add the new one", len(tm.builtin), len(says))
	}
	for locale, lines := range says {
		for _, purpose := range append(tm.samplePurposes(), "") {
			d := TemplateData{Code: "493027", Minutes: 7, Purpose: purpose, Tenant: "shop-7"}
			subject, text, html, err := tm.Render("shop-7", locale, d)
			if err != nil {
				t.Fatal(err)
			}
			words := tm.words[locale][purpose]
			if words == "" {
				words = tm.words[locale][policy.AnyPurpose]
			}
			if strings.Contains(subject, "493027") {
				t.Errorf("%s/%s: the default subject shows the code: %q", locale, purpose, subject)
			}
			if !strings.Contains(subject, "shop-7") || !strings.Contains(subject, words) {
				t.Errorf("%s/%s: subject %q lacks the service (tenant id) or %q", locale, purpose, subject, words)
			}
			for part, body := range map[string]string{"text": text, "html": strings.ReplaceAll(html, "&#39;", "'")} {
				for _, must := range append([]string{"493027", "shop-7", words}, lines...) {
					if !strings.Contains(strings.Join(strings.Fields(body), " "), must) {
						t.Errorf("%s/%s %s lacks %q", locale, purpose, part, must)
					}
				}
			}
		}
	}
}

// TestSubjectShowsTheCodeOnlyWhenAllowed: with code_in_subject off, no subject
// override shows the code, even one that prints the whole data; with it on, one may.
func TestSubjectShowsTheCodeOnlyWhenAllowed(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"sly/en/subject.txt":  `Code {{printf "%v" .}}`, // not {{.Code}}: passes the load check
		"open/en/subject.txt": "{{.Code}} is your {{.ServiceName}} code",
	})
	tm, err := LoadTemplates(dir, mustPolicies(t, "tenants:\n  open:\n    code_in_subject: true\n    service_name: Open\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := TemplateData{Code: "493027", Minutes: 5, Purpose: "login"}
	if subject, _, _, err := tm.Render("sly", "en", d); err != nil || strings.Contains(subject, "493027") {
		t.Fatalf("sly: %q %v", subject, err)
	}
	if subject, _, _, err := tm.Render("open", "en", d); err != nil || subject != "493027 is your Open code" {
		t.Fatalf("open: %q %v", subject, err)
	}
	if subject, _, _, err := tm.Render("open", "de", d); err != nil || subject != "Open: 493027 ist Ihr Code zum Anmelden" {
		t.Fatalf("open, built-in de: %q %v", subject, err)
	}
}

// TestPurposeWording: the tenant's words for the purpose, then the built-in words, then
// the tenant's "*", then the built-in "*", in the language of the part.
func TestPurposeWording(t *testing.T) {
	tm, err := LoadTemplates("", mustPolicies(t, `
tenants:
  acme:
    service_name: Acme
    purpose_text:
      en: {login: "sign in to the shop", "*": "approve this step"}
      de-AT: {login: "zum Einsteigen"}
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ tenant, locale, purpose, want string }{
		{"acme", "en", "login", "Acme: your code to sign in to the shop"},
		{"acme", "en-GB", "login", "Acme: your code to sign in to the shop"},
		{"acme", "en", "signup", "Acme: your code to create your account"},
		{"acme", "en", "payment", "Acme: your code to approve this step"},
		{"acme", "de", "login", "Acme: Ihr Code zum Anmelden"},
		{"acme", "de-AT", "login", "Acme: Ihr Code zum Einsteigen"},
		{"acme", "de", "payment", "Acme: Ihr Code zur Bestätigung Ihrer Identität"},
		{"other", "en", "payment", "other: your code to confirm it's you"},
		{"other", "fr", "login", "other: your code to sign in"}, // no French: all English
	} {
		subject, _, _, err := tm.Render(tc.tenant, tc.locale, TemplateData{Code: "493027", Minutes: 5, Purpose: tc.purpose})
		if err != nil || subject != tc.want {
			t.Errorf("%s %s %s: %q %v, want %q", tc.tenant, tc.locale, tc.purpose, subject, err, tc.want)
		}
	}
}

// TestHTMLIsEscaped: the words of the policy are text in the HTML part, never markup.
func TestHTMLIsEscaped(t *testing.T) {
	tm, err := LoadTemplates("", mustPolicies(t, "tenants:\n  acme:\n    service_name: \"Tom & Jerry's \\\"Shop\\\"\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	subject, text, html, err := tm.Render("acme", "en", TemplateData{Code: "493027", Minutes: 5, Purpose: "login"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(html, "Tom &amp; Jerry&#39;s &#34;Shop&#34;") || strings.Contains(html, `Tom & Jerry`) {
		t.Fatalf("html not escaped:\n%s", html)
	}
	if !strings.Contains(text, `Tom & Jerry's "Shop"`) || !strings.HasPrefix(subject, `Tom & Jerry's "Shop":`) {
		t.Fatalf("text or subject altered: %q\n%s", subject, text)
	}
}

func TestTenantOverrides(t *testing.T) {
	// The acme fixtures show the code in their subjects: acme opts in.
	tm, err := LoadTemplates(filepath.Join("testdata", "overrides"), mustPolicies(t, "tenants:\n  acme:\n    code_in_subject: true\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := TemplateData{Code: "111222", Minutes: 5, Purpose: "login", Tenant: "acme"}
	subject, text, _, err := tm.Render("acme", "fr", d)
	if err != nil || subject != "Votre code Acme : 111222" || !strings.HasPrefix(text, "Votre code : 111222") {
		t.Fatalf("acme/fr: %q %q %v", subject, text, err)
	}
	// The override has only a subject: the bodies come from the built-in English.
	subject, text, html, _ := tm.Render("acme", "en", d)
	if !strings.HasPrefix(subject, "Acme sign-in code 111222") || !strings.Contains(text, "Did not ask for this code?") || !strings.Contains(html, "111222") {
		t.Fatalf("acme/en: %q / %q", subject, text)
	}
	// Another tenant keeps the built-in templates and the default policy.
	if subject, _, _, _ := tm.Render("other", "en", d); subject != "other: your code to sign in" {
		t.Fatalf("other tenant: %q", subject)
	}
	// The same overrides for a tenant that keeps the code out of the subject stop the start.
	if _, err := LoadTemplates(filepath.Join("testdata", "overrides"), nil); err == nil || !strings.Contains(err.Error(), "code_in_subject is off") {
		t.Fatalf("a subject with the code against the policy: %v", err)
	}
	if _, err := LoadTemplates(filepath.Join("testdata", "missing"), nil); err == nil {
		t.Fatal("a missing override directory was accepted")
	}
}

// TestBadOverridesStopTheStart: an override that would send a mail without the code,
// show the code in a subject against the policy, mix languages, or fail to parse or
// render is refused at load, in the overrides directory and in a tenant's template_dir
// alike, with one line naming the tenant, the locale and the file.
func TestBadOverridesStopTheStart(t *testing.T) {
	for _, tc := range []struct {
		name, file, body, policy, want string
	}{
		{"text body without the code", "en/body.txt", "Your code is on its way.", "", "does not show the code"},
		{"html body without the code", "en/body.html", "<p>Your code is on its way.</p>", "", "does not show the code"},
		{"code in a branch that never runs", "en/body.txt", "{{if false}}{{.Code}}{{end}}", "", "does not show the code"},
		{"code for one purpose only", "en/body.txt", `{{if eq .Purpose "login"}}{{.Code}}{{end}}`, "", `does not show the code for purpose "change_email"`},
		{"text does not parse", "en/body.txt", "{{.Code", "", "unclosed action"},
		{"html does not parse", "en/body.html", "{{if .Code}}<p>x</p>", "", "unexpected EOF"},
		{"unknown field", "en/body.txt", "{{.Code}} for {{.Service}}", "", "can't evaluate field Service"},
		{"html in a broken context", "en/body.html", `<a href="{{.Code}}`, "", "ends in a non-text context"},
		{"subject with the code", "en/subject.txt", "Your code {{.Code}}", "", "code_in_subject is off"},
		{"subject with the code behind a flag", "en/subject.txt", "x{{if .CodeInSubject}} {{.Code}}{{end}}", "", "code_in_subject is off"},
		{"subject with $.Code", "en/subject.txt", "{{with .Purpose}}{{$.Code}}{{end}}", "", "code_in_subject is off"},
		{"subject does not parse", "en/subject.txt", "{{.ServiceName", "", "unclosed action"},
		{"purpose words missing for the locale", "fr/body.txt", "Code {{.Code}} pour {{.PurposeText}}", "", "locale fr has no wording"},
		{"purpose words for some purposes only", "fr/body.txt", "Code {{.Code}} pour {{.PurposeText}}", "purpose_text: {fr: {login: se connecter}}", "locale fr has no wording"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, via := range []string{"OTP_TEMPLATES_DIR", "template_dir"} {
				root := t.TempDir()
				tenantDir := filepath.Join(root, "acme")
				writeFiles(t, tenantDir, map[string]string{tc.file: tc.body})
				dir, doc := root, "tenants:\n  acme: {}\n"
				if tc.policy != "" {
					doc = "tenants:\n  acme:\n    " + tc.policy + "\n"
				}
				if via == "template_dir" {
					dir, doc = "", "tenants:\n  acme:\n    template_dir: "+tenantDir+"\n    "+tc.policy+"\n"
				}
				_, err := LoadTemplates(dir, mustPolicies(t, doc))
				if err == nil {
					t.Fatalf("%s: accepted", via)
				}
				msg := err.Error()
				locale, _, _ := strings.Cut(tc.file, "/")
				for _, must := range []string{"templates: tenant acme, locale " + locale + ", " + filepath.Join(tenantDir, tc.file) + ": ", tc.want} {
					if !strings.Contains(msg, must) {
						t.Errorf("%s: error %q lacks %q", via, msg, must)
					}
				}
				if strings.ContainsAny(msg, "\r\n") {
					t.Errorf("%s: error spans lines: %q", via, msg)
				}
			}
		})
	}
}

// TestGoodOverridesLoad: the shapes of override the load check must not refuse.
func TestGoodOverridesLoad(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"acme/fr/subject.txt": "{{.ServiceName}} : votre code {{.PurposeText}}",
		"acme/fr/body.txt":    "Votre code {{.PurposeText}} : {{.Code}}",
		"acme/fr/body.html":   "<p>Votre code {{.PurposeText}} : <b>{{.Code}}</b></p>",
		"acme/de/body.txt":    "{{with .Code}}Code: {{.}}{{end}}",
		"beta/en/subject.txt": "{{.Code}} is your code",
	})
	tm, err := LoadTemplates(dir, mustPolicies(t, `
tenants:
  acme:
    service_name: Acme
    purpose_text: {fr: {"*": "pour confirmer", login: "pour vous connecter"}}
  beta:
    code_in_subject: true
`))
	if err != nil {
		t.Fatal(err)
	}
	subject, text, html, err := tm.Render("acme", "fr-CA", TemplateData{Code: "493027", Minutes: 5, Purpose: "login"})
	if err != nil || subject != "Acme : votre code pour vous connecter" || text != "Votre code pour vous connecter : 493027" || !strings.Contains(html, "<b>493027</b>") {
		t.Fatalf("acme/fr: %q %q %q %v", subject, text, html, err)
	}
	// de keeps its built-in subject and HTML, and their German words.
	subject, text, _, err = tm.Render("acme", "de", TemplateData{Code: "493027", Minutes: 5, Purpose: "signup"})
	if err != nil || subject != "Acme: Ihr Code zum Erstellen Ihres Kontos" || text != "Code: 493027" {
		t.Fatalf("acme/de: %q %q %v", subject, text, err)
	}
	if subject, _, _, err := tm.Render("beta", "en", TemplateData{Code: "493027", Minutes: 5, Purpose: "login"}); err != nil || subject != "493027 is your code" {
		t.Fatalf("beta: %q %v", subject, err)
	}
}

// TestNoFieldCanInjectAHeader: a subject template with a line break (the acme override
// tries "Bcc:"), and header values with CR/LF, never become headers of the mail.
func TestNoFieldCanInjectAHeader(t *testing.T) {
	tm, err := LoadTemplates(filepath.Join("testdata", "overrides"), mustPolicies(t, "tenants:\n  acme:\n    code_in_subject: true\n"))
	if err != nil {
		t.Fatal(err)
	}
	subject, text, html, err := tm.Render("acme", "en", TemplateData{Code: "111222", Minutes: 5, Purpose: "login", Tenant: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.ContainsAny(subject, "\r\n") {
		t.Fatalf("subject spans lines: %q", subject)
	}
	m := &mailer.Message{From: "Acme <no-reply@acme.example>", To: "ana@example.com", Subject: subject + "\r\nCc: evil2@example.com",
		Text: text, HTML: html, Headers: map[string]string{"X-Otp-Tenant": "acme\r\nBcc: evil3@example.com"}}
	msg, err := mailer.Compose(m)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if _, err := msg.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	head, _, _ := strings.Cut(b.String(), "\r\n\r\n")
	for _, line := range strings.Split(head, "\r\n") {
		name, _, _ := strings.Cut(line, ":")
		switch strings.ToLower(name) {
		case "bcc", "cc":
			t.Fatalf("a field injected a header: %q\n%s", line, head)
		}
	}
}
