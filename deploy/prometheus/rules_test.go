package prometheus_test

import (
	"bufio"
	"os"
	"regexp"
	"strings"
	"testing"
	"text/template"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/promql/parser"
	"go.yaml.in/yaml/v3"
)

// ruleFile is the part of a Prometheus rule file these tests read.
type ruleFile struct {
	Groups []struct {
		Name     string `yaml:"name"`
		Interval string `yaml:"interval"`
		Rules    []rule `yaml:"rules"`
	} `yaml:"groups"`
}

type rule struct {
	Alert       string            `yaml:"alert"`
	Record      string            `yaml:"record"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

// promQL parses as a Prometheus server does by default: no experimental functions.
var promQL = parser.NewParser(parser.Options{})

const runbookBase = "https://github.com/otpflow/otpflow/blob/main/README.md#"

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile("alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&rf); err != nil {
		t.Fatalf("alerts.yaml: %v", err)
	}
	return rf
}

// TestRules checks alerts.yaml as Prometheus would load it, and a little more: every
// expression parses as PromQL and yields a vector, every alert has a for:, a severity, a
// summary and a runbook_url naming a heading of README.md, and its annotation templates
// parse.
func TestRules(t *testing.T) {
	rf := loadRules(t)
	anchors := readmeAnchors(t)
	seen := map[string]bool{}
	n := 0
	if len(rf.Groups) == 0 {
		t.Fatal("alerts.yaml has no groups")
	}
	for _, g := range rf.Groups {
		if g.Name == "" || seen["group "+g.Name] {
			t.Errorf("group %q: empty or repeated name", g.Name)
		}
		seen["group "+g.Name] = true
		for _, r := range g.Rules {
			n++
			name := r.Alert
			if name == "" {
				t.Errorf("group %s: a rule without alert: (recording rules do not belong here)", g.Name)
				continue
			}
			if seen[name] {
				t.Errorf("%s: alert defined twice", name)
			}
			seen[name] = true
			expr, err := promQL.ParseExpr(r.Expr)
			if err != nil {
				t.Errorf("%s: expr does not parse: %v", name, err)
				continue
			}
			if ty := expr.Type(); ty != parser.ValueTypeVector {
				t.Errorf("%s: expr yields a %s, an alert needs an instant vector", name, ty)
			}
			if r.For == "" {
				t.Errorf("%s: no for:", name)
			} else if _, err := model.ParseDuration(r.For); err != nil {
				t.Errorf("%s: for: %q: %v", name, r.For, err)
			}
			switch r.Labels["severity"] {
			case "critical", "warning", "info":
			default:
				t.Errorf("%s: severity %q, want critical, warning or info", name, r.Labels["severity"])
			}
			if r.Annotations["summary"] == "" {
				t.Errorf("%s: no summary annotation", name)
			}
			url := r.Annotations["runbook_url"]
			if anchor, ok := strings.CutPrefix(url, runbookBase); !ok {
				t.Errorf("%s: runbook_url %q does not start with %s", name, url, runbookBase)
			} else if !anchors[anchor] {
				t.Errorf("%s: runbook_url anchor #%s is no heading of README.md", name, anchor)
			} else if anchor != strings.ToLower(name) {
				t.Errorf("%s: runbook_url anchor #%s, want #%s (a heading named after the alert)", name, anchor, strings.ToLower(name))
			}
			for k, v := range r.Annotations {
				if _, err := template.New(k).Funcs(templateFuncs).Parse(templateHeader + v); err != nil {
					t.Errorf("%s: annotation %s: %v", name, k, err)
				}
			}
			for k := range r.Labels {
				if !model.LegacyValidation.IsValidLabelName(k) {
					t.Errorf("%s: label name %q", name, k)
				}
			}
		}
	}
	t.Logf("%d alerts in %d groups", n, len(rf.Groups))
}

// templateHeader is what Prometheus puts before every annotation template.
const templateHeader = "{{$labels := .Labels}}{{$externalLabels := .ExternalLabels}}{{$externalURL := .ExternalURL}}{{$value := .Value}}"

// templateFuncs stands in for the functions Prometheus gives annotation templates, so
// that a template calling one it does not know fails to parse here as it would there.
var templateFuncs = template.FuncMap{}

func init() {
	for _, f := range []string{"humanize", "humanize1024", "humanizeDuration", "humanizePercentage",
		"humanizeTimestamp", "title", "toUpper", "toLower", "match", "reReplaceAll", "label",
		"value", "first", "query", "strvalue", "args", "safeHtml", "externalURL", "pathPrefix",
		"graphLink", "tableLink", "sortByLabel", "stripPort", "stripDomain", "parseDuration", "toTime"} {
		templateFuncs[f] = func(...any) any { return nil }
	}
}

// TestRulesNameExportedMetrics fails when a rule selects a metric no service exports, or
// matches on a label that metric does not carry.
func TestRulesNameExportedMetrics(t *testing.T) {
	exported := exportedMetrics(t)
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			checkSelectors(t, "alerts.yaml "+r.Alert, r.Expr, exported)
		}
	}
}

// checkSelectors parses expr and checks each of its series selectors against exported.
func checkSelectors(t *testing.T, where, expr string, exported map[string]series) []string {
	t.Helper()
	e, err := promQL.ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: %v", where, err)
		return nil
	}
	var names []string
	parser.Inspect(e, func(node parser.Node, _ []parser.Node) error {
		vs, ok := node.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		for _, m := range vs.LabelMatchers {
			if m.Name == model.MetricNameLabel && name == "" {
				name = m.Value
			}
		}
		if name == "" {
			t.Errorf("%s: selector %s names no metric", where, vs)
			return nil
		}
		names = append(names, name)
		s, ok := exported[name]
		if !ok {
			t.Errorf("%s: metric %s is not exported by any service", where, name)
			return nil
		}
		if s.labels == nil {
			return nil
		}
		for _, m := range vs.LabelMatchers {
			if m.Name != model.MetricNameLabel && !s.labels[m.Name] {
				t.Errorf("%s: %s has no label %q (it has %v; registered at %s)", where, name, m.Name, sortedKeys(s.labels), s.where)
			}
		}
		return nil
	})
	return names
}

// readmeAnchors returns the anchors GitHub gives the headings of the root README.
func readmeAnchors(t *testing.T) map[string]bool {
	t.Helper()
	f, err := os.Open("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	drop := regexp.MustCompile(`[^\p{L}\p{N}_\- ]`)
	anchors := map[string]bool{}
	sc := bufio.NewScanner(f)
	fence := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "```") {
			fence = !fence
		}
		if fence || !strings.HasPrefix(line, "#") {
			continue
		}
		title := strings.TrimSpace(strings.TrimLeft(line, "#"))
		a := strings.ReplaceAll(drop.ReplaceAllString(strings.ToLower(title), ""), " ", "-")
		anchors[a] = true
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return anchors
}

// TestForDurationsAreSane keeps each for: at most an hour: a longer one hides an incident.
func TestForDurationsAreSane(t *testing.T) {
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			d, err := model.ParseDuration(r.For)
			if err == nil && time.Duration(d) > time.Hour {
				t.Errorf("%s: for: %s is longer than an hour", r.Alert, r.For)
			}
		}
	}
}
