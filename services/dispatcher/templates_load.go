package dispatcher

// Loading and checking tenant template overrides: what a template must show, and what
// it must not, before a dispatcher starts with it.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	texttemplate "text/template"
	"text/template/parse"

	"github.com/otpflow/otpflow/platform/policy"
)

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
