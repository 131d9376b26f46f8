package auditor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// stormRules turns every rule off but supersede_storm: count superseded challenges in one
// tenant within a minute.
func stormRules(count int) map[string]Threshold {
	th := DefaultThresholds()
	for rule, t := range th {
		t.Count = 0
		th[rule] = t
	}
	th[RuleSupersedeStorm] = Threshold{Count: count, Window: time.Minute}
	return th
}

// alertRig is one database and one OTP_EVENTS that any number of auditors share, and the
// events fed to them with event times of the test's choosing.
type alertRig struct {
	t    *testing.T
	js   jetstream.JetStream
	pool *pgxpool.Pool
	th   map[string]Threshold
	n    int
	// base is a minute boundary half an hour ago: the events' times are set from it, so
	// which window an alert falls in does not depend on when the test runs.
	base time.Time
}

func newAlertRig(t *testing.T, th map[string]Threshold) *alertRig {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	return &alertRig{t: t, js: js, pool: testenv.Postgres(t, Spec()), th: th,
		base: time.Now().UTC().Truncate(time.Minute).Add(-30 * time.Minute)}
}

// auditor is a new auditor process on the rig's database and stream.
func (r *alertRig) auditor() *Service {
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ, Alerts: r.th},
		r.pool, r.js, testenv.Logger(io.Discard), prometheus.NewRegistry())
	testenv.Must(r.t, err, "auditor")
	return svc
}

// supersede publishes an otp.superseded of tenant acme that happened at base+secs, and
// returns its event id.
func (r *alertRig) supersede(secs int) string {
	return r.supersedeAt(time.Duration(secs) * time.Second)
}

// supersedeAt is supersede at base+at.
func (r *alertRig) supersedeAt(at time.Duration) string {
	r.n++
	id := fmt.Sprintf("superseded:s%d", r.n)
	m, err := events.NewMsg(events.TypeSuperseded, "acme", id, "", events.Superseded{ChallengeID: fmt.Sprintf("s%d", r.n),
		RequestID: fmt.Sprintf("s%d", r.n), SupersededBy: fmt.Sprintf("s%d", r.n+1)},
		events.Envelope{Source: "test", Time: r.base.Add(at)})
	testenv.Must(r.t, err, "msg")
	_, err = r.js.PublishMsg(context.Background(), m)
	testenv.Must(r.t, err, "publish")
	return id
}

// written waits until the audit log holds the events with these ids.
func (r *alertRig) written(ids ...string) {
	r.t.Helper()
	testenv.Eventually(r.t, 10*time.Second, fmt.Sprintf("%d events written", len(ids)), func() bool {
		var n int
		_ = r.pool.QueryRow(context.Background(), `SELECT count(*) FROM audit.events WHERE event_id = ANY($1)`, ids).Scan(&n)
		return n == len(ids)
	})
}

// settled waits until whatever the auditors raise for the events written so far is on
// the stream: a marker event (one no rule counts) published now is written only after
// every batch before it has been handled, alerts included.
func (r *alertRig) settled() {
	r.t.Helper()
	r.n++
	id := fmt.Sprintf("verified:m%d", r.n)
	m, err := events.NewMsg(events.TypeVerified, "acme", id, "", jsonRaw(`{"challenge_id":"m","request_id":"m"}`), events.Envelope{Source: "test"})
	testenv.Must(r.t, err, "msg")
	_, err = r.js.PublishMsg(context.Background(), m)
	testenv.Must(r.t, err, "publish")
	r.written(id)
}

// alerts are the otp.alert messages on OTP_EVENTS.
func (r *alertRig) alerts() []events.Alert {
	var out []events.Alert
	for _, m := range testenv.Messages(r.t, r.js, events.StreamEvents, events.TypeAlert.Wildcard()) {
		var a events.Alert
		testenv.Must(r.t, json.Unmarshal(m.Data, &a), "alert")
		out = append(out, a)
	}
	return out
}

// TestAlertCountSurvivesARestart: five superseded challenges within a minute raise the
// storm alert. The auditor sees three, stops; a new one (same database, same stream)
// sees the other two: one alert, raised by the fifth. With windows in memory, the new
// auditor counts two and raises nothing.
func TestAlertCountSurvivesARestart(t *testing.T) {
	r := newAlertRig(t, stormRules(5))
	stop := testenv.Start(t, r.auditor().Run)
	r.written(r.supersede(10), r.supersede(11), r.supersede(12))
	if got := r.alerts(); len(got) != 0 {
		t.Fatalf("alerts after three of five: %+v", got)
	}
	stop()

	testenv.Start(t, r.auditor().Run)
	r.written(r.supersede(13), r.supersede(14))
	testenv.Eventually(t, 10*time.Second, "the storm alert", func() bool { return len(r.alerts()) > 0 })
	r.settled()
	got := r.alerts()
	if len(got) != 1 || got[0].Rule != RuleSupersedeStorm || got[0].Value != 5 || !got[0].RaisedAt.Equal(r.base.Add(14*time.Second)) {
		t.Fatalf("alerts %+v, want one supersede_storm of 5 raised by the fifth event", got)
	}
}

// TestAlertWindowsAreExactToTheStamp: a window's older part is read as per-second sums
// (audit.alert_buckets), except the second it starts in, read stamp by stamp. Four
// superseded challenges at 10.2 s, 10.7 s, 11.3 s and 40 s; then two at 70.5 s and 70.6 s.
// The one at 70.5 s counts 10.7, 11.3, 40 and itself: 4 of 5, no alert (counting the whole
// second 10 would make it 5). The one at 70.6 s counts 5: the alert is its. Without the
// per-second sums, or without the stamps of the window's first second, the count falls
// short and no alert comes.
func TestAlertWindowsAreExactToTheStamp(t *testing.T) {
	r := newAlertRig(t, stormRules(5))
	testenv.Start(t, r.auditor().Run)
	ms := time.Millisecond
	r.written(r.supersedeAt(10200*ms), r.supersedeAt(10700*ms), r.supersedeAt(11300*ms), r.supersedeAt(40*time.Second))
	r.written(r.supersedeAt(70500*ms), r.supersedeAt(70600*ms))
	r.settled()
	got := r.alerts()
	if len(got) != 1 || got[0].Value != 5 || !got[0].RaisedAt.Equal(r.base.Add(70600*ms)) {
		t.Fatalf("alerts %+v, want one supersede_storm of 5 raised at base+70.6s", got)
	}
	var buckets, sum int64
	testenv.Must(t, r.pool.QueryRow(context.Background(), `SELECT count(*), coalesce(sum(n), 0) FROM audit.alert_buckets WHERE rule = $1`,
		RuleSupersedeStorm).Scan(&buckets, &sum), "buckets")
	if buckets != 4 || sum != 6 {
		t.Errorf("%d per-second sums of %d stamps, want 4 seconds (10, 11, 40, 70) holding the 6", buckets, sum)
	}
}

// TestNoSecondAlertAfterARestart: an alert was raised at base+14s; after a restart, five
// more superseded challenges at base+60s..64s make the count again, less than a window
// after that alert but in the next window bucket (another alert id, so the stream's
// duplicate window would not drop it): no second alert. With the last alert in memory, the
// new auditor raises one.
func TestNoSecondAlertAfterARestart(t *testing.T) {
	r := newAlertRig(t, stormRules(5))
	stop := testenv.Start(t, r.auditor().Run)
	r.written(r.supersede(10), r.supersede(11), r.supersede(12), r.supersede(13), r.supersede(14))
	testenv.Eventually(t, 10*time.Second, "the storm alert", func() bool { return len(r.alerts()) > 0 })
	stop()

	testenv.Start(t, r.auditor().Run)
	r.written(r.supersede(60), r.supersede(61), r.supersede(62), r.supersede(63), r.supersede(64))
	r.settled()
	if got := r.alerts(); len(got) != 1 || !got[0].RaisedAt.Equal(r.base.Add(14*time.Second)) {
		t.Fatalf("alerts %+v, want only the first, raised at base+14s", got)
	}
}

// TestReplicasShareAlertWindows: two auditors share the database and the durable
// consumer, and the events of one storm are split between them, handled at the same time
// (each delivery alone, through the consumer's own batch path). Six of the eight make the
// count and the three events past it could each raise the alert (the sixth lands on the
// window bucket's edge): one alert, not zero (each auditor saw four) and not two.
func TestReplicasShareAlertWindows(t *testing.T) {
	r := newAlertRig(t, stormRules(6))
	a, b := r.auditor(), r.auditor()
	for secs := 55; secs < 63; secs++ {
		r.supersede(secs)
	}
	ctx := context.Background()
	cons, err := r.js.Consumer(ctx, events.StreamEvents, events.ConsumerAuditor)
	testenv.Must(t, err, "the auditor's consumer")
	var msgs []jetstream.Msg
	testenv.Eventually(t, 10*time.Second, "eight deliveries", func() bool {
		batch, err := cons.Fetch(8-len(msgs), jetstream.FetchMaxWait(time.Second))
		testenv.Must(t, err, "fetch")
		for m := range batch.Messages() {
			msgs = append(msgs, m)
		}
		return len(msgs) == 8
	})
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: events.ConsumerAuditor, JS: r.js,
		DeadLetters: &platform.DeadLetters{Sealer: testDLQ}})
	var wg sync.WaitGroup
	for i, svc := range []*Service{a, b} {
		wg.Go(func() {
			for j := i; j < len(msgs); j += 2 {
				c.Handle(ctx, []jetstream.Msg{msgs[j]}, svc.handleBatch)
			}
		})
	}
	wg.Wait()
	var rows int
	testenv.Must(t, r.pool.QueryRow(ctx, `SELECT count(*) FROM audit.events`).Scan(&rows), "rows")
	if rows != 8 {
		t.Fatalf("%d rows, want the 8 events", rows)
	}
	// Each handler has returned: whatever they raised is on the stream.
	got := r.alerts()
	if len(got) != 1 || got[0].Rule != RuleSupersedeStorm || got[0].Value < 6 {
		t.Fatalf("alerts %+v, want one supersede_storm", got)
	}
	var raised float64
	for _, svc := range []*Service{a, b} {
		raised += testutil.ToFloat64(svc.alerts.raised.WithLabelValues(RuleSupersedeStorm))
	}
	if raised != 1 {
		t.Fatalf("otpflow_auditor_alerts_total summed over both auditors = %v, want 1", raised)
	}
}

// TestAlertStateIsPruned: the alert state older than twice the longest window before the
// newest event goes, once a minute at most; the rest stays.
func TestAlertStateIsPruned(t *testing.T) {
	r := newAlertRig(t, stormRules(2))
	stop := testenv.Start(t, r.auditor().Run)
	// Two batches at least: the first prunes (with a cutoff before everything), the
	// second, within the minute, does not.
	r.written(r.supersede(10), r.supersede(11))
	testenv.Eventually(t, 10*time.Second, "the storm alert", func() bool { return len(r.alerts()) > 0 })
	r.written(r.supersede(200))
	stop()
	ctx := context.Background()
	var buckets int
	state := func() (stamps, raised int) {
		testenv.Must(t, r.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM audit.alert_stamps), (SELECT count(*) FROM audit.alerts_raised),
			(SELECT count(*) FROM audit.alert_buckets)`).Scan(&stamps, &raised, &buckets), "state")
		return stamps, raised
	}
	if s, a := state(); s != 3 || a != 1 || buckets != 3 {
		t.Fatalf("%d stamps, %d alerts raised, %d per-second sums; want 3, 1 and 3", s, a, buckets)
	}
	al := r.auditor().alerts
	// keep is two minutes: a newest event at base+200s+2m keeps only the stamp at base+200s.
	n, err := al.prune(ctx, r.pool, []*Row{{OccurredAt: r.base.Add(200*time.Second + 2*time.Minute)}})
	testenv.Must(t, err, "prune")
	if s, a := state(); n != 3 || s != 1 || a != 0 || buckets != 1 {
		t.Fatalf("pruned %d: %d stamps, %d alerts raised, %d per-second sums left; want 3 pruned, 1, 0 and 1 left", n, s, a, buckets)
	}
	if n, err := al.prune(ctx, r.pool, []*Row{{OccurredAt: time.Now()}}); err != nil || n != 0 {
		t.Fatalf("a second prune within a minute pruned %d (%v)", n, err)
	}
}

// TestEachRuleIsPrunedByItsOwnWindow: a rule's alert state is kept twice its own window,
// not twice the longest of any rule: the per-mail stamps of delivery_failure_ratio (5
// minutes) go long before the hour of bounce_rate is over, whose stamps of the same age
// stay.
func TestEachRuleIsPrunedByItsOwnWindow(t *testing.T) {
	th := stormRules(0)
	th[RuleDeliveryFailureRatio] = Threshold{Count: 20, Window: 5 * time.Minute, Ratio: 0.5}
	th[RuleBounceRate] = Threshold{Count: 100, Window: time.Hour, Ratio: 0.05}
	r := newAlertRig(t, th)
	ctx := context.Background()
	for i, rule := range []string{RuleDeliveryFailureRatio, RuleBounceRate} {
		_, err := r.pool.Exec(ctx, `INSERT INTO audit.alert_stamps (rule, key, at, stream_seq, n) VALUES ($1, '\x01', $2, $3, 1)`,
			rule, r.base, i+1)
		testenv.Must(t, err, "stamp")
	}
	// Twenty minutes on: past twice the five minutes, within twice the hour.
	n, err := r.auditor().alerts.prune(ctx, r.pool, []*Row{{OccurredAt: r.base.Add(20 * time.Minute)}})
	testenv.Must(t, err, "prune")
	var left []string
	rows, err := r.pool.Query(ctx, `SELECT rule FROM audit.alert_stamps UNION ALL SELECT 'sum:' || rule FROM audit.alert_buckets ORDER BY 1`)
	testenv.Must(t, err, "read")
	for rows.Next() {
		var rule string
		testenv.Must(t, rows.Scan(&rule), "scan")
		left = append(left, rule)
	}
	if n != 1 || strings.Join(left, ",") != RuleBounceRate+",sum:"+RuleBounceRate {
		t.Fatalf("pruned %d, left %v; want delivery_failure_ratio's stamp and sum gone, bounce_rate's kept", n, left)
	}
}

// TestAnAlertThatCannotBePublishedHoldsItsEvents: OTP_EVENTS refuses the alert the fifth
// superseded challenge raises (here: the stream is full and discards new messages), with
// an answer no failure table lists. The events of that batch are not the cause: they are
// held in order, tried again past the consumer's MaxDeliver (2 here), and never
// dead-lettered; once the stream takes messages again, the rows and the alert land.
func TestAnAlertThatCannotBePublishedHoldsItsEvents(t *testing.T) {
	r := newAlertRig(t, stormRules(5))
	ctx := context.Background()
	quick := events.AuditorConsumer
	quick.MaxDeliver = 2
	_, err := platform.EnsureConsumer(ctx, r.js, events.StreamEvents, quick)
	testenv.Must(t, err, "auditor consumer")
	ids := []string{r.supersede(10), r.supersede(11), r.supersede(12), r.supersede(13), r.supersede(14)}
	st, err := r.js.Stream(ctx, events.StreamEvents)
	testenv.Must(t, err, "OTP_EVENTS")
	open := st.CachedInfo().Config
	full := open
	full.MaxMsgs, full.Discard = int64(st.CachedInfo().State.Msgs), jetstream.DiscardNew
	_, err = r.js.UpdateStream(ctx, full)
	testenv.Must(t, err, "OTP_EVENTS full")

	reg := prometheus.NewRegistry()
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ, Alerts: r.th},
		r.pool, r.js, testenv.Logger(io.Discard), reg)
	testenv.Must(t, err, "auditor")
	testenv.Start(t, svc.Run)
	held := func() float64 {
		mfs, _ := reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() == "otpflow_deliveries_held_retries_total" {
				return mf.GetMetric()[0].GetCounter().GetValue()
			}
		}
		return 0
	}
	testenv.Eventually(t, 30*time.Second, "the batch held past its MaxDeliver", func() bool { return held() >= 3 })
	if dl := testenv.Messages(t, r.js, events.StreamDLQ, ""); len(dl) != 0 {
		t.Fatalf("%d events dead-lettered because an alert could not be published: %v", len(dl), dl[0].Header)
	}

	_, err = r.js.UpdateStream(ctx, open)
	testenv.Must(t, err, "OTP_EVENTS takes messages again")
	// At the held batch's next try: its delay has grown with its tries (up to 30 s).
	testenv.Eventually(t, 45*time.Second, "the held events written", func() bool {
		var n int
		_ = r.pool.QueryRow(ctx, `SELECT count(*) FROM audit.events WHERE event_id = ANY($1)`, ids).Scan(&n)
		return n == len(ids)
	})
	testenv.Eventually(t, 30*time.Second, "the storm alert", func() bool { return len(r.alerts()) == 1 })
	if dl := testenv.Messages(t, r.js, events.StreamDLQ, ""); len(dl) != 0 {
		t.Fatalf("%d dead letters", len(dl))
	}
}

// TestAlertWindowsUseTheKey: the windows read is a prepared statement, and PostgreSQL
// caches a generic plan for it after a few executions. That plan must read each window
// by an index, never the whole table: a provider's window holds a stamp per call (300,000
// at 1,000 calls a second over 5 minutes), and a plan that hashed them all cost the
// auditor 18 ms a batch at 30,000 stamps. The plan is forced generic, over 20,000 stamps
// of one key with fresh statistics, which is where the join form chose the whole table.
func TestAlertWindowsUseTheKey(t *testing.T) {
	ctx := context.Background()
	pool := testenv.Postgres(t, Spec())
	base := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	key := bytes.Repeat([]byte{7}, 32)
	_, err := pool.Exec(ctx, `INSERT INTO audit.alert_stamps (rule, key, at, stream_seq, n, failed)
		SELECT $1, $2, $3::timestamptz + i * interval '1 millisecond', i, 1, 0 FROM generate_series(1, 20000) i`,
		RuleDeliveryFailureRatio, key, base)
	testenv.Must(t, err, "stamps")
	_, err = testenv.Admin(t, pool).Exec(ctx, `ANALYZE audit.alert_stamps; ANALYZE audit.alert_buckets`) // as autovacuum would
	testenv.Must(t, err, "analyze")
	conn, err := pool.Acquire(ctx)
	testenv.Must(t, err, "conn")
	defer conn.Release()
	defer conn.Conn().Exec(ctx, `DEALLOCATE windows; RESET plan_cache_mode`)
	_, err = conn.Exec(ctx, `SET plan_cache_mode = force_generic_plan`)
	testenv.Must(t, err, "generic plans")
	_, err = conn.Exec(ctx, `PREPARE windows(text[], bytea[], timestamptz[], timestamptz[]) AS `+windowsSQL)
	testenv.Must(t, err, "prepare")
	lit := func(at time.Time) string { return "'" + at.Format(time.RFC3339Nano) + "'" }
	var plan string
	testenv.Must(t, conn.QueryRow(ctx, fmt.Sprintf(`EXPLAIN (FORMAT JSON) EXECUTE windows(ARRAY['%s'], ARRAY['\x%x'::bytea], ARRAY[%s::timestamptz], ARRAY[%s::timestamptz])`,
		RuleDeliveryFailureRatio, key, lit(base.Add(5*time.Second)), lit(base.Add(6*time.Second)))).Scan(&plan), "explain")
	if !strings.Contains(plan, `"Relation Name": "alert_stamps"`) {
		t.Fatalf("the plan reads no alert_stamps: %s", plan)
	}
	// Every read of the stamps is an index scan bounded by the window's own columns (q's):
	// a lookup per window, not a read of the table for a join to filter.
	perWindow := regexp.MustCompile(`\bq(_[0-9]+)?\.(rule|key|from_at|to_at)\b`)
	var walk func(n map[string]any)
	walk = func(n map[string]any) {
		if n["Relation Name"] == "alert_stamps" {
			cond, _ := n["Index Cond"].(string)
			if typ := n["Node Type"]; (typ != "Index Scan" && typ != "Index Only Scan") || !perWindow.MatchString(cond) {
				t.Fatalf("the cached plan reads audit.alert_stamps other than by window (%s, %q):\n%s", typ, cond, plan)
			}
		}
		kids, _ := n["Plans"].([]any)
		for _, k := range kids {
			walk(k.(map[string]any))
		}
	}
	var doc []map[string]any
	testenv.Must(t, json.Unmarshal([]byte(plan), &doc), "plan")
	walk(doc[0]["Plan"].(map[string]any))
}
