package dispatcher

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

var update = flag.Bool("update", false, "rewrite testdata/golden from the templates")

// TestGoldenTemplates renders every built-in locale and compares with testdata/golden.
func TestGoldenTemplates(t *testing.T) {
	tm, err := LoadTemplates("")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ locale, name string }{{"en", "en"}, {"de", "de"}, {"de-AT", "de"}, {"pt-BR", "en"}, {"", "en"}} {
		for _, minutes := range []int{1, 5} {
			subject, text, html, err := tm.Render("acme", tc.locale, TemplateData{Code: "493027", Minutes: minutes, Purpose: "login", Tenant: "acme"})
			if err != nil {
				t.Fatal(err)
			}
			got := "Subject: " + subject + "\n\n" + text + "\n----\n" + html
			path := filepath.Join("testdata", "golden", tc.name+"-"+string(rune('0'+minutes))+".txt")
			if *update && tc.locale == tc.name {
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
				t.Errorf("locale %q, %d min: rendering differs from %s:\n%s", tc.locale, minutes, path, got)
			}
			for _, must := range []string{"493027"} {
				if !strings.Contains(subject, must) || !strings.Contains(text, must) || !strings.Contains(html, must) {
					t.Errorf("locale %q: the code is missing from a part", tc.locale)
				}
			}
		}
	}
}

func TestTenantOverrides(t *testing.T) {
	tm, err := LoadTemplates(filepath.Join("testdata", "overrides"))
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
	// Another tenant keeps the built-in templates.
	if subject, _, _, _ := tm.Render("other", "en", d); subject != "Your verification code: 111222" {
		t.Fatalf("other tenant: %q", subject)
	}
	if _, err := LoadTemplates(filepath.Join("testdata", "missing")); err == nil {
		t.Fatal("a missing override directory was accepted")
	}
	bad := t.TempDir()
	if err := os.MkdirAll(filepath.Join(bad, "acme", "en"), 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.WriteFile(filepath.Join(bad, "acme", "en", "body.txt"), []byte("{{.Code"), 0o644)
	if _, err := LoadTemplates(bad); err == nil {
		t.Fatal("a template that does not parse was accepted")
	}
}

// TestNoFieldCanInjectAHeader: a subject template with a line break (the acme override
// tries "Bcc:"), and header values with CR/LF, never become headers of the mail.
func TestNoFieldCanInjectAHeader(t *testing.T) {
	tm, err := LoadTemplates(filepath.Join("testdata", "overrides"))
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
