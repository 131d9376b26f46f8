package dispatcher

import (
	"bytes"
	"embed"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/template/parse"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/policy"
)

//go:embed templates
var templateFS embed.FS

// TemplateData is what a mail template may show. Every field is validated or made by
// the pipeline (the code is of the tenant's alphabet, the tenant and purpose match the
// contract's patterns, the words come from the validated tenant policy); none is free
// text from a request.
type TemplateData struct {
	Code    string
	Minutes int
	Purpose string
	Tenant  string

	// Render fills these from the tenant policy; values the caller sets are ignored.
	ServiceName   string // service_name, or the tenant id when the policy has none
	PurposeText   string // the purpose in words, in the language of the part ("sign in")
	CodeInSubject bool   // code_in_subject; when false the subject is rendered with Code empty
}

// A mail has three parts, each from one file of a locale directory.
const (
	subjectPart = iota
	textPart
	htmlPart
)

var partFiles = [3]string{"subject.txt", "body.txt", "body.html"}

// wordsFile holds a built-in locale's purposes in words: "<purpose>: <phrase>" lines,
// "*" for the purposes it does not name. Tenants word purposes in their policy instead.
const wordsFile = "purposes.txt"

// part is one parsed template file.
type part struct {
	file   string // subject.txt, body.txt or body.html
	locale string // the locale whose wording fills .PurposeText: an inherited part keeps its own
	exec   func(io.Writer, any) error
	trees  []*parse.Tree // for checks on what the template refers to
}

func (p part) render(d TemplateData) (string, error) {
	var b bytes.Buffer
	if err := p.exec(&b, d); err != nil {
		return "", err
	}
	return b.String(), nil
}

// templateSet is the three parts of one locale.
type templateSet [3]part

// Templates holds the built-in templates and wording per locale, the tenant overrides,
// and the tenant policies that fill the service name, the purpose wording and whether a
// subject may show the code.
type Templates struct {
	policies *policy.Set
	builtin  map[string]*templateSet            // locale -> set
	words    map[string]map[string]string       // locale -> purpose -> phrase
	tenants  map[string]map[string]*templateSet // tenant -> locale -> set
}

// DefaultLocale is used when a request names a locale that has no templates.
const DefaultLocale = "en"

// sampleCode is the code the load-time check renders: every body must show it whole.
const sampleCode = "739204"

// LoadTemplates reads the built-in templates, then the tenant overrides in
// dir/<tenant>/<locale>/{subject.txt,body.txt,body.html} when dir is not empty, then the
// template_dir of every tenant policies name (nil policies: every tenant gets the
// defaults). An override may leave out files: they come from the built-in set of that
// locale (or of English). Every override is checked against its tenant's policy (see
// AddTenant); the first failure stops the start with one line naming the tenant, the
// locale and the file.
func LoadTemplates(dir string, policies *policy.Set) (*Templates, error) {
	if policies == nil {
		policies = policy.Defaults()
	}
	builtinFS, _ := fs.Sub(templateFS, "templates")
	t := &Templates{policies: policies, builtin: map[string]*templateSet{}, words: map[string]map[string]string{},
		tenants: map[string]map[string]*templateSet{}}
	locales, err := fs.ReadDir(builtinFS, ".")
	if err != nil {
		return nil, err
	}
	for _, d := range locales {
		if t.words[d.Name()], err = parseWords(builtinFS, d.Name()+"/"+wordsFile); err != nil {
			return nil, fmt.Errorf("templates %s: %w", d.Name(), err)
		}
		set, _, err := parseSet(builtinFS, d.Name(), nil)
		if err != nil {
			return nil, fmt.Errorf("templates %s: %w", d.Name(), err)
		}
		t.builtin[d.Name()] = set
	}
	if t.builtin[DefaultLocale] == nil {
		return nil, fmt.Errorf("templates: no %q locale", DefaultLocale)
	}
	for locale, set := range t.builtin {
		if err := t.check("", "templates", locale, set, []int{subjectPart, textPart, htmlPart}, policy.Default()); err != nil {
			return nil, err
		}
	}
	if dir != "" {
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
	}
	tenants := policies.Tenants()
	slices.Sort(tenants)
	for _, tenant := range tenants {
		if tdir := policies.For(tenant).TemplateDir; tdir != "" {
			if err := t.AddTenant(tenant, tdir); err != nil {
				return nil, err
			}
		}
	}
	return t, nil
}

// pick chooses the set for tenant and locale: the tenant's override for the locale or
// its language, then the built-in locale or language, then the tenant's English, then
// the built-in English.
func (t *Templates) pick(tenant, locale string) *templateSet {
	over := t.tenants[tenant]
	lang := language(locale)
	for _, c := range []*templateSet{over[locale], over[lang], t.builtin[locale], t.builtin[lang], over[DefaultLocale]} {
		if c != nil {
			return c
		}
	}
	return t.builtin[DefaultLocale]
}

// Render returns the subject, text and HTML of one mail to tenant in locale. It fills
// the service name, the purpose wording and CodeInSubject from the tenant's policy; the
// subject template gets no code unless the policy allows it, and the subject is always
// one line.
func (t *Templates) Render(tenant, locale string, d TemplateData) (subject, text, html string, err error) {
	p := t.policies.For(tenant)
	set := t.pick(tenant, locale)
	var out [3]string
	for i, pt := range set {
		if out[i], err = pt.render(t.fill(tenant, p, wordsLocale(locale, pt.locale), i, d)); err != nil {
			return "", "", "", fmt.Errorf("%s/%s: %w", pt.locale, pt.file, err)
		}
	}
	// A subject is one line whatever a template does: no template can add a header.
	return strings.Join(strings.Fields(out[subjectPart]), " "), out[textPart], out[htmlPart], nil
}

// wordsLocale is the locale whose purpose wording a part gets: the requested one when
// the part is in its language (a tenant's de-AT words in the built-in de templates),
// else the part's own (no pt-BR words in an English fallback).
func wordsLocale(requested, partLocale string) string {
	if language(requested) == language(partLocale) {
		return requested
	}
	return partLocale
}

// fill completes d for part i of a set in locale.
func (t *Templates) fill(tenant string, p policy.Policy, locale string, i int, d TemplateData) TemplateData {
	d.ServiceName = p.ServiceName
	if d.ServiceName == "" {
		d.ServiceName = tenant
	}
	d.PurposeText = t.purposeText(p, locale, d.Purpose)
	d.CodeInSubject = p.CodeInSubject
	if i == subjectPart && !p.CodeInSubject {
		d.Code = "" // whatever the template does ({{.}}, printf), the subject cannot show it
	}
	return d
}

// purposeText words purpose in locale: the tenant's words for it, the built-in words for
// it, the tenant's "*", the built-in "*", and English only when the locale has none (the
// load check refuses templates that would mix languages that way).
func (t *Templates) purposeText(p policy.Policy, locale, purpose string) string {
	locs := locales(locale)
	for _, src := range []func(l, k string) string{
		func(l, k string) string { return p.PurposeText[l][k] },
		func(l, k string) string { return t.words[l][k] },
	} {
		for _, l := range locs {
			if w := src(l, purpose); w != "" {
				return w
			}
		}
	}
	for _, words := range []map[string]map[string]string{p.PurposeText, t.words} {
		for _, l := range locs {
			if w := words[l][policy.AnyPurpose]; w != "" {
				return w
			}
		}
	}
	return t.words[DefaultLocale][policy.AnyPurpose]
}

// hasWords reports whether locale words every purpose without falling back to English.
func (t *Templates) hasWords(p policy.Policy, locale string) bool {
	for _, l := range locales(locale) {
		if p.PurposeText[l][policy.AnyPurpose] != "" || t.words[l][policy.AnyPurpose] != "" {
			return true
		}
	}
	return false
}

// samplePurposes are the purposes the load check renders: every built-in one and one
// that none words.
func (t *Templates) samplePurposes() []string {
	var out []string
	for k := range t.words[DefaultLocale] {
		if k != policy.AnyPurpose {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return append(out, "other")
}

// locales is locale and its language, most specific first.
func locales(locale string) []string {
	if lang := language(locale); lang != locale {
		return []string{locale, lang}
	}
	return []string{locale}
}

func language(locale string) string {
	lang, _, _ := strings.Cut(locale, "-")
	return strings.ToLower(lang)
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
