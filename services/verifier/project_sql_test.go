package verifier

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// batchCounter counts the statements of each pipelined batch a pool sends.
type batchCounter struct {
	mu      sync.Mutex
	batches []int
}

func (c *batchCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}
func (c *batchCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (c *batchCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceBatchStartData) context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batches = append(c.batches, d.Batch.Len())
	return ctx
}
func (c *batchCounter) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (c *batchCounter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

func (c *batchCounter) take() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.batches
	c.batches = nil
	return b
}

// TestProjectionWritesABatchSetBased: a batch of codes is written with a statement per
// kind of row, whatever its size: the erasure locks, the challenges, the codes, in one
// round trip. Only updates of existing rows come after, one per supersession and per
// challenge the recipient_failures rule cuts (its recipient had failures). Per code
// statements, as before, fail it. The rows are those of the events.
func TestProjectionWritesABatchSetBased(t *testing.T) {
	d := testenv.NewDB(t)
	d.Migrate(t, Spec())
	cfg, err := pgxpool.ParseConfig(d.RoleURL(Spec().Name))
	testenv.Must(t, err, "pool config")
	counter := &batchCounter{}
	cfg.ConnConfig.Tracer = counter
	pool, err := pgxpool.NewWithConfig(t.Context(), cfg)
	testenv.Must(t, err, "pool")
	t.Cleanup(pool.Close)
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	st := &store{pool: pool}

	// Two recipients failed recently: the first codes of their new challenges fall under
	// recipient_failures (one failure in the hour: two attempts).
	admin := testenv.Admin(t, pool)
	_, err = admin.Exec(t.Context(), `INSERT INTO verifier.recipient_failures (tenant, recipient_key, stamps)
		VALUES ('acme', 'k1:req-3', ARRAY[now()]), ('acme', 'k1:req-7', ARRAY[now()]),
			('acme', 'k1:req-8', ARRAY[now() - interval '2 hours'])`)
	testenv.Must(t, err, "failures")

	const n = 60
	risk := failureRisk{failures: 1, window: time.Hour, maxAttempts: 2}
	var items []*projection
	for i := range n {
		c := challengeFor(t, pepper, "acme", fmt.Sprintf("cccccccc-cccc-4ccc-8ccc-%012d", i), fmt.Sprintf("req-%d", i), 1, "123456")
		c.Risk = []string{"new_device"}
		p := &projection{tenant: "acme", challenge: &c}
		if i < 10 {
			p.failureRisk = risk
		}
		items = append(items, p)
	}
	// Two supersessions of challenges of the batch, and one of a challenge not yet
	// projected, in between the codes.
	sup := func(i int) *projection {
		return &projection{tenant: "acme", superseded: &events.Superseded{Tenant: "acme",
			ChallengeID: fmt.Sprintf("cccccccc-cccc-4ccc-8ccc-%012d", i), RequestID: fmt.Sprintf("req-%d", i)}}
	}
	items = slices.Insert(items, 30, sup(1), sup(2), sup(100))
	testenv.Must(t, st.project(t.Context(), items), "project")

	// The first round trip: locks, challenges, codes. The second: the three
	// supersessions and the two challenges cut.
	if got := counter.take(); fmt.Sprint(got) != "[3 5]" {
		t.Errorf("statements per round trip %v, want [3 5]", got)
	}
	for _, p := range items {
		if p.refused != nil || p.erased {
			t.Errorf("%+v refused %v, erased %v", p, p.refused, p.erased)
		}
	}
	rows, err := admin.Query(t.Context(), `SELECT c.request_id, c.status, c.max_attempts, c.risk, c.recipient_keys,
			(SELECT count(*) FROM verifier.codes k WHERE k.challenge_id = c.challenge_id)
		FROM verifier.challenges c ORDER BY c.created_at, c.request_id`)
	testenv.Must(t, err, "rows")
	got := map[string]string{}
	for rows.Next() {
		var request, status string
		var maxAttempts, codes int
		var riskLabels, recipients []string
		testenv.Must(t, rows.Scan(&request, &status, &maxAttempts, &riskLabels, &recipients, &codes), "scan")
		got[request] = fmt.Sprintf("%s %d %v %v %d", status, maxAttempts, riskLabels, recipients, codes)
	}
	testenv.Must(t, rows.Err(), "rows")
	if len(got) != n+1 {
		t.Errorf("%d challenge rows, want %d", len(got), n+1)
	}
	for request, want := range map[string]string{
		"req-0":   "active 5 [new_device] [k1:req-0] 1",
		"req-1":   "superseded 5 [new_device] [k1:req-1] 1",
		"req-3":   "active 2 [new_device recipient_failures] [k1:req-3] 1",
		"req-7":   "active 2 [new_device recipient_failures] [k1:req-7] 1",
		"req-8":   "active 5 [new_device] [k1:req-8] 1", // its failure is out of the window
		"req-59":  "active 5 [new_device] [k1:req-59] 1",
		"req-100": "superseded 0 [] [] 0",
	} {
		if got[request] != want {
			t.Errorf("%s: %q, want %q", request, got[request], want)
		}
	}

	// The same batch again, as on a redelivery: nothing changes, and no update is sent
	// for the challenges already cut.
	testenv.Must(t, st.project(t.Context(), items), "project again")
	if got := counter.take(); fmt.Sprint(got) != "[3 3]" {
		t.Errorf("statements per round trip of the redelivery %v, want [3 3]", got)
	}

	// One batch of the cases the statements decide per row, in the stream's order.
	_, err = admin.Exec(t.Context(), `INSERT INTO verifier.erasures (tenant, recipient_key, erased_at)
		VALUES ('acme', 'k1:gone-req', now() + interval '1 minute');
		INSERT INTO verifier.recipient_failures (tenant, recipient_key, stamps) VALUES ('acme', 'k1:req-4', ARRAY[now()]);
		UPDATE verifier.challenges SET attempts = 1 WHERE request_id = 'req-4'`)
	testenv.Must(t, err, "an erasure, a tried challenge")
	code := func(challenge, request string, seq int) *projection {
		c := challengeFor(t, pepper, "acme", challenge, request, seq, "654321")
		return &projection{tenant: "acme", challenge: &c}
	}
	const x, y, late = "aaaaaaaa-aaaa-4aaa-8aaa-000000000001", "aaaaaaaa-aaaa-4aaa-8aaa-000000000002", "aaaaaaaa-aaaa-4aaa-8aaa-000000000003"
	holds := code(x, "dup-req", 1)
	otherChallenge := code(y, "dup-req", 1) // the request is held by x
	otherRequest := code(x, "other-req", 1) // x is held by dup-req
	supersededFirst := &projection{tenant: "acme", superseded: &events.Superseded{Tenant: "acme", ChallengeID: late, RequestID: "late-req"}}
	lateCode := code(late, "late-req", 1)
	gone := code("aaaaaaaa-aaaa-4aaa-8aaa-000000000004", "gone-req", 1)
	tried := code(fmt.Sprintf("cccccccc-cccc-4ccc-8ccc-%012d", 4), "req-4", 2)
	tried.failureRisk = risk
	batch := []*projection{holds, otherChallenge, otherRequest, supersededFirst, lateCode, gone, tried}
	testenv.Must(t, st.project(t.Context(), batch), "project the cases")
	// The supersession's update only: the tried challenge has an attempt, so the rule
	// that cuts attempts no longer applies to it.
	if got := counter.take(); fmt.Sprint(got) != "[3 1]" {
		t.Errorf("statements per round trip of the cases %v, want [3 1]", got)
	}
	for name, c := range map[string]struct {
		p       *projection
		refused bool
		erased  bool
	}{
		"the first code of a request": {holds, false, false}, "another challenge of the request": {otherChallenge, true, false},
		"the challenge for another request": {otherRequest, true, false}, "a supersession before its code": {supersededFirst, false, false},
		"the code after its supersession": {lateCode, false, false}, "a code of an erased person": {gone, false, true},
		"a new code of a tried challenge": {tried, false, false},
	} {
		if (c.p.refused != nil) != c.refused || c.p.erased != c.erased {
			t.Errorf("%s: refused %v, erased %v; want refused %v, erased %v", name, c.p.refused, c.p.erased, c.refused, c.erased)
		}
	}
	var cases []string
	rows, err = admin.Query(t.Context(), `SELECT c.request_id || ' ' || c.challenge_id || ' ' || c.status || ' ' || c.max_attempts || ' ' ||
			(SELECT count(*) FROM verifier.codes k WHERE k.challenge_id = c.challenge_id)
		FROM verifier.challenges c WHERE c.request_id IN ('dup-req', 'other-req', 'late-req', 'gone-req', 'req-4') ORDER BY 1`)
	testenv.Must(t, err, "rows")
	for rows.Next() {
		var c string
		testenv.Must(t, rows.Scan(&c), "scan")
		cases = append(cases, c)
	}
	testenv.Must(t, rows.Err(), "rows")
	want := []string{"dup-req " + x + " active 5 1", "late-req " + late + " superseded 0 1",
		"req-4 cccccccc-cccc-4ccc-8ccc-000000000004 active 5 2"}
	if fmt.Sprint(cases) != fmt.Sprint(want) {
		t.Errorf("rows after the cases:\n%s\nwant\n%s", strings.Join(cases, "\n"), strings.Join(want, "\n"))
	}
}
