package dispatcher

import (
	"bytes"
	"embed"
	"fmt"
	htmltemplate "html/template"
	"io/fs"
	"strings"
	texttemplate "text/template"
)

//go:embed templates
var templateFS embed.FS

// TemplateData is what a mail template may show.
type TemplateData struct {
	Code    string
	Minutes int
	Purpose string
	Tenant  string
}

// Templates holds the subject, text and HTML templates of each locale.
type Templates struct {
	subject map[string]*texttemplate.Template
	text    map[string]*texttemplate.Template
	html    map[string]*htmltemplate.Template
}

// DefaultLocale is used when a request names a locale that has no templates.
const DefaultLocale = "en"

// LoadTemplates reads templates/<locale>/{subject.txt,body.txt,body.html}.
func LoadTemplates() (*Templates, error) {
	root, _ := fs.Sub(templateFS, "templates")
	t := &Templates{subject: map[string]*texttemplate.Template{}, text: map[string]*texttemplate.Template{}, html: map[string]*htmltemplate.Template{}}
	dirs, err := fs.ReadDir(root, ".")
	if err != nil {
		return nil, err
	}
	for _, d := range dirs {
		loc := d.Name()
		read := func(name string) (string, error) {
			b, err := fs.ReadFile(root, loc+"/"+name)
			return string(b), err
		}
		subj, err1 := read("subject.txt")
		text, err2 := read("body.txt")
		html, err3 := read("body.html")
		if err := firstErr(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("templates %s: %w", loc, err)
		}
		if t.subject[loc], err = texttemplate.New("subject").Option("missingkey=error").Parse(strings.TrimSpace(subj)); err != nil {
			return nil, err
		}
		if t.text[loc], err = texttemplate.New("text").Option("missingkey=error").Parse(text); err != nil {
			return nil, err
		}
		if t.html[loc], err = htmltemplate.New("html").Option("missingkey=error").Parse(html); err != nil {
			return nil, err
		}
	}
	if t.subject[DefaultLocale] == nil {
		return nil, fmt.Errorf("templates: no %q locale", DefaultLocale)
	}
	return t, nil
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// locale picks the best locale: exact, then the language alone, then the default.
func (t *Templates) locale(want string) string {
	if _, ok := t.subject[want]; ok {
		return want
	}
	if lang, _, _ := strings.Cut(want, "-"); lang != "" {
		if _, ok := t.subject[strings.ToLower(lang)]; ok {
			return strings.ToLower(lang)
		}
	}
	return DefaultLocale
}

// Render returns the subject, text and HTML of one mail.
func (t *Templates) Render(locale string, d TemplateData) (subject, text, html string, err error) {
	loc := t.locale(locale)
	var sb, tb, hb bytes.Buffer
	if err := t.subject[loc].Execute(&sb, d); err != nil {
		return "", "", "", err
	}
	if err := t.text[loc].Execute(&tb, d); err != nil {
		return "", "", "", err
	}
	if err := t.html[loc].Execute(&hb, d); err != nil {
		return "", "", "", err
	}
	// A subject is one line whatever a template does.
	subject = strings.Join(strings.Fields(sb.String()), " ")
	return subject, tb.String(), hb.String(), nil
}
