package dispatcher

import "testing"

// BenchmarkRender renders one mail (subject, text and HTML) from the built-in English
// templates and the default policy: the dispatcher's per-code work before the send.
//
//	cd services/dispatcher && go test -run '^$' -bench Render -benchmem
func BenchmarkRender(b *testing.B) {
	tmpl, err := LoadTemplates("", nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, _, _, err := tmpl.Render("acme", "en", TemplateData{Code: "424242", Minutes: 5, Purpose: "login"}); err != nil {
			b.Fatal(err)
		}
	}
}
