package prometheus_test

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
)

const dashboardFile = "../grafana/otpflow.json"

// dashboard is the part of a Grafana dashboard these tests read.
type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Datasource *datasource     `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int         `json:"id"`
	Type       string      `json:"type"`
	Title      string      `json:"title"`
	Datasource *datasource `json:"datasource"`
	Targets    []struct {
		RefID      string      `json:"refId"`
		Expr       string      `json:"expr"`
		Datasource *datasource `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

// panels returns every panel, those inside collapsed rows too.
func (d dashboard) panels() []panel {
	var out []panel
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			out = append(out, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return out
}

// grafanaVars are the variables a panel query may use, each replaced by a value PromQL
// accepts where the variable stands.
var grafanaVars = strings.NewReplacer(
	"$__rate_interval", "5m", "${__rate_interval}", "5m",
	"$__interval", "1m", "${__interval}", "1m",
	"$__range", "1h", "${__range}", "1h",
	"${provider}", ".*", "$provider", ".*",
)

var leftoverVar = regexp.MustCompile(`\$\{?[A-Za-z_]+`)

// TestDashboard checks the dashboard's shape: a Prometheus datasource variable that every
// panel and query uses, unique panel ids, and queries that parse as PromQL once Grafana's
// variables are put in.
func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Error("dashboard without uid or title")
	}
	hasDS := false
	for _, v := range d.Templating.List {
		if v.Name == "datasource" && v.Type == "datasource" && string(v.Query) == `"prometheus"` {
			hasDS = true
		}
	}
	if !hasDS {
		t.Fatal(`no datasource variable: {"name": "datasource", "type": "datasource", "query": "prometheus"}`)
	}
	ids := map[int]string{}
	queries := 0
	for _, p := range d.panels() {
		if prev, dup := ids[p.ID]; dup {
			t.Errorf("panel %q: id %d already used by %q", p.Title, p.ID, prev)
		}
		ids[p.ID] = p.Title
		if p.Type == "row" {
			continue
		}
		if !usesVariable(p.Datasource) {
			t.Errorf("panel %q: datasource %+v, want ${datasource}", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q: no query", p.Title)
		}
		for _, q := range p.Targets {
			queries++
			if !usesVariable(q.Datasource) {
				t.Errorf("panel %q, query %s: datasource %+v, want ${datasource}", p.Title, q.RefID, q.Datasource)
			}
			expr := grafanaVars.Replace(q.Expr)
			if v := leftoverVar.FindString(expr); v != "" {
				t.Errorf("panel %q, query %s: variable %s unknown to this test (add it to grafanaVars)", p.Title, q.RefID, v)
				continue
			}
			if _, err := promQL.ParseExpr(expr); err != nil {
				t.Errorf("panel %q, query %s: %v", p.Title, q.RefID, err)
			}
		}
	}
	t.Logf("%d panels, %d queries", len(ids), queries)
}

func usesVariable(ds *datasource) bool {
	return ds != nil && ds.Type == "prometheus" && ds.UID == "${datasource}"
}

// labelValues matches the variable queries Grafana's Prometheus datasource runs.
var labelValues = regexp.MustCompile(`^label_values\(\s*([^,]+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$`)

// TestDashboardNamesExportedMetrics fails when a panel or variable selects a metric no
// service exports, or matches on a label that metric does not carry.
func TestDashboardNamesExportedMetrics(t *testing.T) {
	exported := exportedMetrics(t)
	d := loadDashboard(t)
	for _, p := range d.panels() {
		for _, q := range p.Targets {
			checkSelectors(t, "panel "+p.Title+" "+q.RefID, grafanaVars.Replace(q.Expr), exported)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			if err := json.Unmarshal(v.Query, &q.Query); err != nil {
				t.Errorf("variable %s: query %s", v.Name, v.Query)
				continue
			}
		}
		m := labelValues.FindStringSubmatch(q.Query)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, q.Query)
			continue
		}
		// The label must be one the selected metric carries.
		checkSelectors(t, "variable "+v.Name, m[1]+`{`+m[2]+`=~".+"}`, exported)
	}
}
