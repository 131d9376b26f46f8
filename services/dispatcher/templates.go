package dispatcher

import (
	"bufio"
	"bytes"
	"embed"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	texttemplate "text/template"
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

// AddTenant loads tenant's overrides from dir/<locale>/{subject.txt,body.txt,body.html}
// over any loaded before. LoadTemplates calls it for the overrides directory and for
// every template_dir. It refuses an override file that
//   - does not parse, or fails to render for any built-in purpose;
//   - is a body (text or HTML) that does not show the code: the template must print
//     {{.Code}} whole, whatever the purpose or lifetime;
//   - is a subject that refers to .Code while the tenant's code_in_subject is off (the
//     policy wins: a subject that cannot show the code is not what its author meant);
//   - uses .PurposeText in a locale that has no wording for any purpose, neither built
//     in nor a "*" entry in the tenant's purpose_text (English words in, say, a French
//     mail).
func (t *Templates) AddTenant(tenant, dir string) error {
	p := t.policies.For(tenant)
	tfs := os.DirFS(dir)
	locs, err := fs.ReadDir(tfs, ".")
	if err != nil {
		return fmt.Errorf("templates: tenant %s: %w", tenant, err)
	}
	for _, ld := range locs {
		if !ld.IsDir() {
			continue
		}
		base := t.builtin[ld.Name()]
		if base == nil {
			base = t.builtin[DefaultLocale]
		}
		set, own, err := parseSet(tfs, ld.Name(), base)
		if err != nil {
			return fmt.Errorf("templates: tenant %s, locale %s, %w", tenant, ld.Name(), pathErr(dir, err))
		}
		if err := t.check(tenant, dir, ld.Name(), set, own, p); err != nil {
			return err
		}
		if t.tenants[tenant] == nil {
			t.tenants[tenant] = map[string]*templateSet{}
		}
		t.tenants[tenant][ld.Name()] = set
	}
	return nil
}

// check applies AddTenant's rules to the parts of set that the directory gave; tenant ""
// is the built-in set, whose subject shows the code only {{if .CodeInSubject}}.
func (t *Templates) check(tenant, dir, locale string, set *templateSet, own []int, p policy.Policy) error {
	who := "tenant " + tenant
	if tenant == "" {
		who = "built-in"
	}
	for _, i := range own {
		pt := set[i]
		fail := func(format string, args ...any) error {
			return fmt.Errorf("templates: %s, locale %s, %s: %s", who, locale,
				filepath.Join(dir, locale, pt.file), oneLine(fmt.Sprintf(format, args...)))
		}
		if i == subjectPart && !p.CodeInSubject && tenant != "" && mentions(pt.trees, "Code") {
			return fail("the subject shows the code but code_in_subject is off (subjects show on lock screens and in provider logs): drop {{.Code}} or set code_in_subject: true in the tenant policy")
		}
		if mentions(pt.trees, "PurposeText") && !t.hasWords(p, pt.locale) {
			return fail(`uses .PurposeText but locale %s has no wording: add purpose_text: {%s: {"*": "..."}} to the tenant policy`, pt.locale, pt.locale)
		}
		for _, purpose := range t.samplePurposes() {
			for _, minutes := range []int{1, 5} {
				out, err := pt.render(t.fill(tenant, p, pt.locale, i, TemplateData{Code: sampleCode, Minutes: minutes, Purpose: purpose, Tenant: tenant}))
				if err != nil {
					return fail("%v", err)
				}
				if i != subjectPart && !strings.Contains(out, sampleCode) {
					return fail("does not show the code for purpose %q: the body must print {{.Code}}", purpose)
				}
			}
		}
	}
	return nil
}

// parseSet parses locale's templates from fsys and says which parts it found there;
// missing files come from base (when base is nil every file is required).
func parseSet(fsys fs.FS, locale string, base *templateSet) (*templateSet, []int, error) {
	set := &templateSet{}
	if base != nil {
		*set = *base
	}
	var own []int
	for i, name := range partFiles {
		b, err := fs.ReadFile(fsys, locale+"/"+name)
		if errors.Is(err, fs.ErrNotExist) && base != nil {
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		pt := part{file: name, locale: locale}
		if i == htmlPart {
			tm, err := htmltemplate.New(name).Option("missingkey=error").Parse(string(b))
			if err != nil {
				return nil, nil, fmt.Errorf("%s: %w", locale+"/"+name, err)
			}
			pt.exec = tm.Execute
			for _, x := range tm.Templates() {
				pt.trees = append(pt.trees, x.Tree)
			}
		} else {
			tm, err := texttemplate.New(name).Option("missingkey=error").Parse(string(b))
			if err != nil {
				return nil, nil, fmt.Errorf("%s: %w", locale+"/"+name, err)
			}
			pt.exec = tm.Execute
			for _, x := range tm.Templates() {
				pt.trees = append(pt.trees, x.Tree)
			}
		}
		set[i] = pt
		own = append(own, i)
	}
	return set, own, nil
}

// parseWords reads a built-in purposes.txt, which must word "*".
func parseWords(fsys fs.FS, name string) (map[string]string, error) {
	b, err := fs.ReadFile(fsys, name)
	if err != nil {
		return nil, err
	}
	words := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		purpose, phrase, ok := strings.Cut(line, ":")
		if purpose, phrase = strings.TrimSpace(purpose), strings.TrimSpace(phrase); !ok || purpose == "" || phrase == "" {
			return nil, fmt.Errorf("%s:%d: want <purpose>: <phrase>", name, n)
		}
		words[purpose] = phrase
	}
	if words[policy.AnyPurpose] == "" {
		return nil, fmt.Errorf("%s: no %q line", name, policy.AnyPurpose)
	}
	return words, nil
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

// mentions reports whether any of trees refers to the field name of the data, as .name,
// $.name or (x).name, anywhere, including in branches that may never run.
func mentions(trees []*parse.Tree, name string) bool {
	var walk func(n parse.Node) bool
	walk = func(n parse.Node) bool {
		switch n := n.(type) {
		case *parse.ListNode:
			if n != nil {
				return slices.ContainsFunc(n.Nodes, walk)
			}
		case *parse.ActionNode:
			return walk(n.Pipe)
		case *parse.PipeNode:
			if n != nil {
				return slices.ContainsFunc(n.Cmds, func(c *parse.CommandNode) bool { return walk(c) })
			}
		case *parse.CommandNode:
			return slices.ContainsFunc(n.Args, walk)
		case *parse.FieldNode:
			return slices.Contains(n.Ident, name)
		case *parse.ChainNode:
			return slices.Contains(n.Field, name) || walk(n.Node)
		case *parse.VariableNode:
			return slices.Contains(n.Ident[1:], name)
		case *parse.IfNode:
			return walk(n.Pipe) || walk(n.List) || walk(n.ElseList)
		case *parse.RangeNode:
			return walk(n.Pipe) || walk(n.List) || walk(n.ElseList)
		case *parse.WithNode:
			return walk(n.Pipe) || walk(n.List) || walk(n.ElseList)
		case *parse.TemplateNode:
			return walk(n.Pipe)
		}
		return false
	}
	return slices.ContainsFunc(trees, func(tr *parse.Tree) bool { return tr != nil && walk(tr.Root) })
}

// pathErr makes a template error name the file under dir.
func pathErr(dir string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %v", filepath.Join(dir, pe.Path), pe.Err)
	}
	return fmt.Errorf("%s/%s", dir, oneLine(err.Error()))
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
