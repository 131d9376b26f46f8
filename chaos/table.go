package chaos

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// WriteTable writes rows as the suite's table, then each row's notes and violations.
func WriteTable(w io.Writer, rows []Row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\trequests\tfaults\tlost\tduplicates\tin-flight re-sends\trecover\tsettled\tresult")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", r.Scenario, r.Requests, r.Faults, r.Lost, r.Duplicates,
			r.InFlight, dur(r.Recover), dur(r.Settled), r.Result())
	}
	_ = tw.Flush()
	for _, r := range rows {
		if len(r.Notes)+len(r.Violations) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s:\n", r.Scenario)
		for _, v := range r.Violations {
			fmt.Fprintf(w, "  FAIL %s\n", v)
		}
		for _, n := range r.Notes {
			fmt.Fprintf(w, "  - %s\n", n)
		}
	}
}

// Markdown writes rows as a Markdown table, for docs/reliability.md.
func Markdown(w io.Writer, rows []Row) {
	fmt.Fprintln(w, "| scenario | requests | faults | lost | duplicates | in-flight re-sends | recover | settled | result |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		fmt.Fprintf(w, "| %s | %d | %d | %d | %d | %d | %s | %s | %s |\n", strings.ReplaceAll(r.Scenario, "|", "\\|"),
			r.Requests, r.Faults, r.Lost, r.Duplicates, r.InFlight, dur(r.Recover), dur(r.Settled), r.Result())
	}
}
