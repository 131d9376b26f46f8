package dispatcher

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	texttemplate "text/template"

	"github.com/otpflow/otpflow/events"
)

//go:embed templates
var templateFS embed.FS

// TemplateData is what a mail template may show. Every field is validated or made by
// the pipeline (the code is digits, the tenant and purpose match the contract's patterns);
// none is free text from a request.
type TemplateData struct {
	Code    string
	Minutes int
	Purpose string
	Tenant  string
}

// templateSet is the three templates of one locale.
type templateSet struct {
	subject *texttemplate.Template
	text    *texttemplate.Template
	html    *htmltemplate.Template
}

// Templates holds the built-in templates per locale and the tenant overrides.
type Templates struct {
	builtin map[string]*templateSet            // locale -> set
	tenants map[string]map[string]*templateSet // tenant -> locale -> set
}

// DefaultLocale is used when a request names a locale that has no templates.
const DefaultLocale = "en"

// Template file names inside a locale directory.
const (
	subjectFile = "subject.txt"
	textFile    = "body.txt"
	htmlFile    = "body.html"
)

// LoadTemplates reads the built-in templates and, when dir is not empty, the tenant
// overrides in dir/<tenant>/<locale>/{subject.txt,body.txt,body.html}. An override may
// leave out files: they come from the built-in set of that locale (or of English). A
// template that does not parse stops the start.
func LoadTemplates(dir string) (*Templates, error) {
	builtinFS, _ := fs.Sub(templateFS, "templates")
	t := &Templates{builtin: map[string]*templateSet{}, tenants: map[string]map[string]*templateSet{}}
	locales, err := fs.ReadDir(builtinFS, ".")
	if err != nil {
		return nil, err
	}
	for _, d := range locales {
		set, err := parseSet(builtinFS, d.Name(), nil)
		if err != nil {
			return nil, fmt.Errorf("templates %s: %w", d.Name(), err)
		}
		t.builtin[d.Name()] = set
	}
	if t.builtin[DefaultLocale] == nil {
		return nil, fmt.Errorf("templates: no %q locale", DefaultLocale)
	}
	if dir == "" {
		return t, nil
	}
	tenants, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("templates: %w", err)
	}
	for _, td := range tenants {
		if !td.IsDir() {
			continue
		}
		if !events.ValidTenant(td.Name()) {
			return nil, fmt.Errorf("templates: %s is not a tenant name", filepath.Join(dir, td.Name()))
		}
		if err := t.AddTenant(td.Name(), filepath.Join(dir, td.Name())); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// AddTenant loads tenant's overrides from dir/<locale>/{subject.txt,body.txt,body.html}
// (the template_dir of the tenant policy), over any loaded before.
func (t *Templates) AddTenant(tenant, dir string) error {
	tfs := os.DirFS(dir)
	locs, err := fs.ReadDir(tfs, ".")
	if err != nil {
		return fmt.Errorf("templates %s: %w", tenant, err)
	}
	for _, ld := range locs {
		if !ld.IsDir() {
			continue
		}
		base := t.builtin[ld.Name()]
		if base == nil {
			base = t.builtin[DefaultLocale]
		}
		set, err := parseSet(tfs, ld.Name(), base)
		if err != nil {
			return fmt.Errorf("templates %s/%s: %w", tenant, ld.Name(), err)
		}
		if t.tenants[tenant] == nil {
			t.tenants[tenant] = map[string]*templateSet{}
		}
		t.tenants[tenant][ld.Name()] = set
	}
	return nil
}

// parseSet parses locale's templates from fsys; missing files come from base (when
// base is nil every file is required).
func parseSet(fsys fs.FS, locale string, base *templateSet) (*templateSet, error) {
	read := func(name string) (string, bool, error) {
		b, err := fs.ReadFile(fsys, locale+"/"+name)
		if errors.Is(err, fs.ErrNotExist) && base != nil {
			return "", false, nil
		}
		return string(b), err == nil, err
	}
	set := &templateSet{}
	if base != nil {
		*set = *base
	}
	if src, ok, err := read(subjectFile); err != nil {
		return nil, err
	} else if ok {
		if set.subject, err = texttemplate.New("subject").Option("missingkey=error").Parse(src); err != nil {
			return nil, err
		}
	}
	if src, ok, err := read(textFile); err != nil {
		return nil, err
	} else if ok {
		if set.text, err = texttemplate.New("text").Option("missingkey=error").Parse(src); err != nil {
			return nil, err
		}
	}
	if src, ok, err := read(htmlFile); err != nil {
		return nil, err
	} else if ok {
		if set.html, err = htmltemplate.New("html").Option("missingkey=error").Parse(src); err != nil {
			return nil, err
		}
	}
	return set, nil
}

// pick chooses the set for tenant and locale: the tenant's override for the locale or
// its language, then the built-in locale or language, then the tenant's English, then
// the built-in English.
func (t *Templates) pick(tenant, locale string) *templateSet {
	lang, _, _ := strings.Cut(locale, "-")
	lang = strings.ToLower(lang)
	over := t.tenants[tenant]
	for _, c := range []*templateSet{over[locale], over[lang], t.builtin[locale], t.builtin[lang], over[DefaultLocale]} {
		if c != nil {
			return c
		}
	}
	return t.builtin[DefaultLocale]
}

// Render returns the subject, text and HTML of one mail.
func (t *Templates) Render(tenant, locale string, d TemplateData) (subject, text, html string, err error) {
	set := t.pick(tenant, locale)
	var sb, tb, hb bytes.Buffer
	if err := set.subject.Execute(&sb, d); err != nil {
		return "", "", "", err
	}
	if err := set.text.Execute(&tb, d); err != nil {
		return "", "", "", err
	}
	if err := set.html.Execute(&hb, d); err != nil {
		return "", "", "", err
	}
	// A subject is one line whatever a template does: no template can add a header.
	subject = strings.Join(strings.Fields(sb.String()), " ")
	return subject, tb.String(), hb.String(), nil
}
