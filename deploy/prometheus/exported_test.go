package prometheus_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// series is one metric name a service exports and the label names its samples carry
// (nil: not known from the source, so not checked).
type series struct {
	name   string
	labels map[string]bool
	where  string // file:line of the registration
}

// targetLabels are added by Prometheus to every scraped sample.
var targetLabels = []string{"job", "instance"}

// exportedMetrics reads every non-test Go file of platform/ and services/ and returns the
// metric names they register: the Name of every prometheus.{Counter,Gauge,Histogram,
// Summary}Opts literal and the name of every prometheus.NewDesc, a histogram as its
// _bucket, _sum and _count series and a summary as itself, _sum and _count; then the Go and
// process collectors' names (platform.NewRegistry) and Prometheus's own up. Reading the
// source rather than a registry finds the vectors too, which a registry only exports once a
// label value was used.
func exportedMetrics(t *testing.T) map[string]series {
	t.Helper()
	out := map[string]series{}
	add := func(s series) {
		if _, dup := out[s.name]; !dup {
			out[s.name] = s
		}
	}
	fset := token.NewFileSet()
	for _, dir := range []string{"../../platform", "../../services"} {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && (d.Name() == "testenv" || d.Name() == "integration" || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			f, err := parser.ParseFile(fset, path, nil, 0)
			if err != nil {
				return err
			}
			for _, s := range registrations(fset, f) {
				add(s)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("read the services' sources: %v", err)
		}
	}
	if len(out) == 0 {
		t.Fatal("no metric registration found in platform/ and services/")
	}
	// The collectors every service registers (platform.NewRegistry), gathered for real.
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather the Go and process collectors: %v", err)
	}
	for _, mf := range families {
		labels := map[string]bool{}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = true
			}
		}
		add(series{name: mf.GetName(), labels: withTargetLabels(labels), where: "platform.NewRegistry"})
	}
	add(series{name: "up", labels: withTargetLabels(map[string]bool{}), where: "Prometheus"})
	return out
}

func withTargetLabels(m map[string]bool) map[string]bool {
	for _, l := range targetLabels {
		m[l] = true
	}
	return m
}

// registrations finds the metrics one file declares.
func registrations(fset *token.FileSet, f *ast.File) []series {
	// Label sets assigned to a name (labels := prometheus.Labels{...}), for ConstLabels and
	// NewDesc arguments that name them.
	named := map[string]map[string]bool{}
	ast.Inspect(f, func(n ast.Node) bool {
		if as, ok := n.(*ast.AssignStmt); ok && len(as.Lhs) == len(as.Rhs) {
			for i, rhs := range as.Rhs {
				if id, ok := as.Lhs[i].(*ast.Ident); ok {
					if keys, ok := labelKeys(rhs, nil); ok {
						named[id.Name] = keys
					}
				}
			}
		}
		return true
	})
	var out []series
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.CallExpr:
			fn := selectorName(n.Fun)
			switch {
			case fn == "prometheus.NewDesc" && len(n.Args) == 4:
				name, ok := stringLit(n.Args[0])
				if !ok {
					return true
				}
				labels, ok := labelKeys(n.Args[2], named)
				if constLabels, ok2 := labelKeys(n.Args[3], named); ok && ok2 {
					for k := range constLabels {
						labels[k] = true
					}
				} else {
					labels = nil
				}
				out = append(out, series{name: name, labels: withTargetLabelsOrNil(labels), where: fset.Position(n.Pos()).String()})
				return true
			case strings.HasPrefix(fn, "prometheus.New") && strings.HasSuffix(fn, "Vec") && len(n.Args) == 2:
				opts, ok := n.Args[0].(*ast.CompositeLit)
				if !ok {
					return true
				}
				vecLabels, ok := labelKeys(n.Args[1], named)
				for _, s := range fromOpts(fset, opts, named) {
					if s.labels != nil && ok {
						for k := range vecLabels {
							s.labels[k] = true
						}
					} else {
						s.labels = nil
					}
					out = append(out, s)
				}
				return false // the Opts literal inside is handled here
			}
		case *ast.CompositeLit:
			out = append(out, fromOpts(fset, n, named)...)
		}
		return true
	})
	return out
}

func withTargetLabelsOrNil(m map[string]bool) map[string]bool {
	if m == nil {
		return nil
	}
	return withTargetLabels(m)
}

// fromOpts returns the series of a prometheus.*Opts literal with a literal Name, none for
// any other literal.
func fromOpts(fset *token.FileSet, lit *ast.CompositeLit, named map[string]map[string]bool) []series {
	kind := strings.TrimSuffix(strings.TrimPrefix(selectorName(lit.Type), "prometheus."), "Opts")
	switch kind {
	case "Counter", "Gauge", "Histogram", "Summary":
	default:
		return nil
	}
	var name string
	labels := map[string]bool{}
	for _, e := range lit.Elts {
		kv, ok := e.(*ast.KeyValueExpr)
		if !ok {
			continue
		}
		switch key := kv.Key.(*ast.Ident).Name; key {
		case "Name":
			name, _ = stringLit(kv.Value)
		case "Namespace", "Subsystem":
			return nil // not used by otpflow; the full name would have to be joined
		case "ConstLabels":
			keys, ok := labelKeys(kv.Value, named)
			if !ok {
				labels = nil
				continue
			}
			for k := range keys {
				if labels != nil {
					labels[k] = true
				}
			}
		}
	}
	if name == "" {
		return nil
	}
	where := fset.Position(lit.Pos()).String()
	mk := func(n string, extra ...string) series {
		var l map[string]bool
		if labels != nil {
			l = withTargetLabels(map[string]bool{})
			for k := range labels {
				l[k] = true
			}
			for _, k := range extra {
				l[k] = true
			}
		}
		return series{name: n, labels: l, where: where}
	}
	switch kind {
	case "Histogram":
		return []series{mk(name+"_bucket", "le"), mk(name + "_sum"), mk(name + "_count")}
	case "Summary":
		return []series{mk(name, "quantile"), mk(name + "_sum"), mk(name + "_count")}
	}
	return []series{mk(name)}
}

// labelKeys reads a label set: nil, a []string{...} literal, a prometheus.Labels{...}
// literal, or a name assigned one of those in the file.
func labelKeys(e ast.Expr, named map[string]map[string]bool) (map[string]bool, bool) {
	switch e := e.(type) {
	case *ast.Ident:
		if e.Name == "nil" {
			return map[string]bool{}, true
		}
		if keys, ok := named[e.Name]; ok {
			return copyKeys(keys), true
		}
	case *ast.CompositeLit:
		keys := map[string]bool{}
		switch t := e.Type.(type) {
		case *ast.ArrayType:
			if id, ok := t.Elt.(*ast.Ident); !ok || id.Name != "string" {
				return nil, false
			}
			for _, el := range e.Elts {
				s, ok := stringLit(el)
				if !ok {
					return nil, false
				}
				keys[s] = true
			}
			return keys, true
		default:
			if selectorName(t) != "prometheus.Labels" {
				return nil, false
			}
			for _, el := range e.Elts {
				kv, ok := el.(*ast.KeyValueExpr)
				if !ok {
					return nil, false
				}
				s, ok := stringLit(kv.Key)
				if !ok {
					return nil, false
				}
				keys[s] = true
			}
			return keys, true
		}
	}
	return nil, false
}

func copyKeys(m map[string]bool) map[string]bool {
	c := make(map[string]bool, len(m))
	for k := range m {
		c[k] = true
	}
	return c
}

func selectorName(e ast.Expr) string {
	if sel, ok := e.(*ast.SelectorExpr); ok {
		if x, ok := sel.X.(*ast.Ident); ok {
			return x.Name + "." + sel.Sel.Name
		}
	}
	return ""
}

func stringLit(e ast.Expr) (string, bool) {
	lit, ok := e.(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return "", false
	}
	s, err := strconv.Unquote(lit.Value)
	return s, err == nil
}

// TestExportedMetricsAreFound guards the source reading itself: metrics of each kind of
// registration must be among what it finds, with their labels.
func TestExportedMetricsAreFound(t *testing.T) {
	got := exportedMetrics(t)
	for name, labels := range map[string][]string{
		"otpflow_dispatcher_sends_total":                      {"provider", "outcome", "job", "instance"}, // CounterVec
		"otpflow_dispatcher_send_seconds_bucket":              {"provider", "le"},                         // HistogramVec
		"otpflow_issuer_batch_size_count":                     {},                                         // Histogram
		"otpflow_audit_verify_ok":                             {},                                         // Gauge
		"otpflow_consumer_pending_messages":                   {"stream", "consumer"},                     // NewDesc with const labels
		"otpflow_consumer_oldest_unsettled_age_seconds":       {"stream", "consumer"},                     // ConstLabels by name
		"otpflow_deliveries_settled_total":                    {"consumer", "outcome"},                    // platform
		"otpflow_verifier_verifications_total":                {"status"},
		"process_resident_memory_bytes":                       {},
		"go_goroutines":                                       {},
		"up":                                                  {"job", "instance"},
		"otpflow_dispatcher_breaker_state":                    {"provider"},
		"otpflow_auditor_alerts_total":                        {"rule"},
		"otpflow_audit_verify_last_success_timestamp_seconds": {},
	} {
		s, ok := got[name]
		if !ok {
			t.Errorf("%s not found among the exported metrics", name)
			continue
		}
		if s.labels == nil {
			t.Errorf("%s (%s): labels not read", name, s.where)
			continue
		}
		for _, l := range labels {
			if !s.labels[l] {
				t.Errorf("%s (%s): label %q not found, have %v", name, s.where, l, sortedKeys(s.labels))
			}
		}
	}
	if _, ok := got["otpflow_no_such_metric_total"]; ok {
		t.Error("a name nobody registers was found")
	}
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
