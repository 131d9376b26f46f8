package chaos

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"
)

// Fault injects a scenario's fault into e and returns once it is healed (the process
// restarted, the server back, the provider answering again), with the number of
// faults it injected.
type Fault func(e *Env, logf func(format string, args ...any)) (int, error)

// Scenario is one fault under a steady load.
type Scenario struct {
	Name    string
	Options Options
	// Rate is the load in requests per second.
	Rate int
	// Pre is how long the load runs before the fault (the baseline), Post how long after
	// it is healed.
	Pre, Post time.Duration
	// Settle bounds the wait, after the load stops, for every request's outcome.
	Settle time.Duration
	Fault  Fault
	// InFlight is how many codes the fault may mail twice by design: the sends a killed
	// dispatcher had in flight (rows it claimed and never recorded, at most its
	// OTP_DISPATCH_CONCURRENCY). Nil for every other fault.
	InFlight func(e *Env) int
}

// Run brings up an environment, runs the load and the fault, waits for the pipeline to
// settle, checks every invariant (each violation is a test error) and returns the
// scenario's row of the table.
func (sc Scenario) Run(t *testing.T, bins Bins) Row {
	t.Helper()
	started := time.Now()
	e := NewEnv(t, bins, sc.Options)
	t.Logf("%s: environment up in %v (%s)", sc.Name, time.Since(started).Round(time.Millisecond), e.Dir)
	nc, js := e.Connect(t)
	ledger := NewLedger(js)
	load := NewLoad(js, sc.Rate)
	e.lastAck = load.LastAck
	prober := NewProber(nc, e, load, 100*time.Millisecond)

	pollCtx, stopPolling := context.WithCancel(context.Background())
	defer stopPolling()
	go func() { // keeps the ledger near the stream's head, so the final reads are short
		for pollCtx.Err() == nil {
			_ = ledger.Poll()
			select {
			case <-pollCtx.Done():
			case <-time.After(time.Second):
			}
		}
	}()

	loadStart := time.Now()
	load.Start()
	prober.Start()
	time.Sleep(sc.Pre) // the baseline: the load's own timeline, not a condition
	faultAt := time.Now()
	faults, err := sc.Fault(e, t.Logf)
	if err != nil {
		t.Errorf("%s: injecting the fault: %v", sc.Name, err)
	}
	healedAt := time.Now()
	t.Logf("%s: %d fault(s) injected at +%v, healed after %v", sc.Name, faults, faultAt.Sub(loadStart).Round(time.Millisecond),
		healedAt.Sub(faultAt).Round(time.Millisecond))
	time.Sleep(sc.Post)
	load.Stop()
	loadEnd := time.Now()
	prober.Stop() // waits for the verifications under way: a user still waiting for a code
	stopPolling()

	reqs := load.Requests()
	var waitFor []Request
	for _, r := range reqs {
		if r.Acked && r.Kind != Repeat {
			waitFor = append(waitFor, r)
		}
	}
	deadline := time.Now().Add(sc.Settle)
	for {
		if err := ledger.Poll(); err != nil {
			t.Logf("reading OTP_EVENTS: %v", err)
		}
		ok, missing := ledger.Settled(waitFor)
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Logf("%s: not every request settled %v after the load stopped (%s has no outcome)", sc.Name, sc.Settle, missing)
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("%s: settled %v after the load stopped; %s", sc.Name, time.Since(loadEnd).Round(time.Millisecond), ledger)

	c := &check{sc: sc, e: e, ledger: ledger, load: load, prober: prober, reqs: reqs, t: t,
		loadStart: loadStart, faultAt: faultAt, healedAt: healedAt}
	row := c.run(nc)
	row.Faults = faults
	if r := e.UnplannedRestarts(); r != "" {
		row.Notes = append(row.Notes, "exited on their own and were restarted: "+r)
	}
	for _, v := range row.Violations {
		t.Errorf("%s: %s", sc.Name, v)
	}
	if t.Failed() {
		for _, s := range Services {
			t.Logf("%s log: %s", s, e.Procs[s].Log)
		}
	}
	t.Logf("%s: took %v", sc.Name, time.Since(started).Round(time.Second))
	return row
}

// sample is one trip through a flow (a request to its outcome, a verification to its
// answer, an event to its audit row).
type sample struct {
	what       string
	start, end time.Time
	done       bool
}

// recovery measures how long a flow took to come back after a fault at faultAt:
// recover is when trips were again as fast as before the fault (the first trip that
// started after the last slow or unfinished one; slow is more than twice the baseline's
// 99th percentile, and at least a second; the baseline is the trips that ended before
// the fault), settle when the last trip started before
// that point ended (the backlog and every redelivery worked off). ok is false when the
// flow never came back within the run.
func recovery(samples []sample, loadStart, faultAt time.Time) (recover, settle, bound time.Duration, ok bool) {
	var base []time.Duration
	var after []sample
	for _, s := range samples {
		// The baseline: trips that started after the first second (processes warming
		// up) and ended before the fault touched them.
		if s.done && s.start.After(loadStart.Add(time.Second)) && s.end.Before(faultAt) {
			base = append(base, s.end.Sub(s.start))
		}
		if !s.start.Before(faultAt) {
			after = append(after, s)
		}
	}
	bound = time.Second
	if len(base) > 0 {
		slices.Sort(base)
		bound = max(bound, 2*base[(len(base)*99)/100])
	}
	slices.SortFunc(after, func(a, b sample) int { return a.start.Compare(b.start) })
	last := -1
	for i, s := range after {
		if !s.done || s.end.Sub(s.start) > bound {
			last = i
		}
	}
	if last == len(after)-1 && last >= 0 {
		return 0, 0, bound, false
	}
	back := faultAt
	if last >= 0 {
		back = after[last+1].start
	}
	end := back
	for _, s := range samples {
		if s.start.Before(back) {
			if !s.done {
				return back.Sub(faultAt), 0, bound, false
			}
			if s.end.After(end) {
				end = s.end
			}
		}
	}
	return back.Sub(faultAt), end.Sub(faultAt), bound, true
}

// Row is one scenario's line in the table.
type Row struct {
	Scenario string
	// Requests is how many otp.requested the app published and JetStream acknowledged.
	Requests int
	Faults   int
	// Lost: accepted requests with no outcome, codes with no terminal event, codes
	// reported delivered that no sink received, and codes that ended unmailed.
	Lost int
	// Duplicates are mails beyond one per code that no rule of the design allows.
	Duplicates int
	// InFlight are mails beyond one per code that the design allows: the sends a killed
	// dispatcher had in flight, and the single deliberate re-send after an ambiguous
	// answer.
	InFlight int
	// Recover is the fault to the pipeline's trips being as fast as before; Settled the
	// fault to the last trip started before then ending. Negative: never within the run.
	Recover, Settled time.Duration
	Violations       []string
	Notes            []string
}

// Result is "ok" or the number of violated invariants.
func (r Row) Result() string {
	if len(r.Violations) == 0 {
		return "ok"
	}
	return fmt.Sprintf("FAIL (%d)", len(r.Violations))
}
