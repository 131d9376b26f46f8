package auditor

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

func TestSummarizeOperatorAction(t *testing.T) {
	at := time.Date(2026, 11, 26, 10, 2, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		ev   events.OperatorAction
		want string
	}{
		{"erase", events.OperatorAction{Action: "audit.erase", Identity: events.OperatorIdentity{User: "alice", Host: "ops-1"},
			Tenant: "_system", Detail: "3 rows", At: at}, "operator alice@ops-1 ran audit.erase: 3 rows"},
		{"with a NATS user", events.OperatorAction{Action: "audit.purge", Identity: events.OperatorIdentity{User: "alice", Host: "ops-1",
			NATSUser: "ops"}, Tenant: "_system", Detail: "0 rows older than 9600h0m0s", At: at},
			"operator alice@ops-1 (NATS user ops) ran audit.purge: 0 rows older than 9600h0m0s"},
		{"no detail", events.OperatorAction{Action: "audit.purge", Identity: events.OperatorIdentity{User: "bo", Host: "h"}},
			"operator bo@h ran audit.purge"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := summarize(string(events.TypeOperatorAction), tc.ev); got != tc.want {
				t.Errorf("summarize = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestTrailAndErasureFindAPersonAcrossASubjectKeyRotation: rows written under k1 (events of
// this release carrying the hash, and of an earlier one carrying the address), then the
// ring rotated to k2,k1 and more rows under k2. A trail by address finds every request, an
// erasure reaches every row, and the chain still verifies.
func TestTrailAndErasureFindAPersonAcrossASubjectKeyRotation(t *testing.T) {
	ctx := t.Context()
	pool := testenv.Postgres(t, Spec())
	oldKey := keys.Generate("k1", 32)
	old, err := keys.ParseSubjects(oldKey)
	testenv.Must(t, err, "old ring")
	newKey := keys.Generate("k2", 32)
	rotated, err := keys.ParseSubjects(newKey + "," + oldKey)
	testenv.Must(t, err, "rotated ring")
	newOnly, err := keys.ParseSubjects(newKey)
	testenv.Must(t, err, "new key alone")
	const ana = "Ana@Example.com"
	bodies := []struct {
		ring *keys.Subjects
		body string
	}{
		{old, fmt.Sprintf(`{"challenge_id":"c-1","tenant":"acme","request_id":"before","code_seq":1,"recipient_hash":%q,"recipient_masked":"A***@Example.com"}`, old.Subject("acme", ana))},
		{old, `{"challenge_id":"c-2","tenant":"acme","request_id":"earlier-release","code_seq":1,"recipient":"ana@example.com","client_ip":"203.0.113.7","code_hmac":"c2VjcmV0LWhtYWM=","session_id":"session-of-ana"}`},
		{rotated, fmt.Sprintf(`{"challenge_id":"c-3","tenant":"acme","request_id":"after","code_seq":1,"recipient_hash":%q,"recipient_masked":"a***@example.com"}`, rotated.Subject("acme", ana))},
		{rotated, fmt.Sprintf(`{"challenge_id":"c-4","tenant":"acme","request_id":"someone-else","code_seq":1,"recipient_hash":%q,"recipient_masked":"b***@example.com"}`, rotated.Subject("acme", "bo@example.com"))},
		{rotated, fmt.Sprintf(`{"challenge_id":"c-5","tenant":"beta","request_id":"other-tenant","code_seq":1,"recipient_hash":%q,"recipient_masked":"a***@example.com"}`, rotated.Subject("beta", ana))},
	}
	var rows []*Row
	for i, b := range bodies {
		typ, tenant := events.TypeIssued, "acme"
		if i == 4 {
			tenant = "beta"
		}
		r, err := ToRow(testKey, b.ring, uint64(i+1), time.Now(), typ.Subject(tenant), map[string][]string{"Ce-Id": {fmt.Sprint(i)}}, []byte(b.body))
		testenv.Must(t, err, "row %d", i)
		rows = append(rows, &r)
	}
	_, err = testChain.Append(ctx, pool, rows)
	testenv.Must(t, err, "append")
	dump, _ := testenv.DumpSchema(t, pool, Schema)
	testenv.AssertNoPlaintext(t, dump, "ana@example.com", "203.0.113.7", "session-of-ana", "c2VjcmV0LWhtYWM=")

	steps, err := Trail(ctx, pool, rotated, "acme", "", "ANA@example.com")
	testenv.Must(t, err, "trail")
	var got []string
	for _, s := range steps {
		got = append(got, s.RequestID)
	}
	if strings.Join(got, ",") != "before,earlier-release,after" {
		t.Fatalf("trail by address after the rotation: %v, want before, earlier-release, after", got)
	}
	if steps, err := Trail(ctx, pool, newOnly, "acme", "", ana); err != nil || len(steps) != 1 {
		t.Fatalf("a ring without k1 found %d steps (%v): the old rows must need the old key", len(steps), err)
	}

	n, err := Erase(ctx, testenv.Admin(t, pool), rotated, ana)
	testenv.Must(t, err, "erase")
	if n != 4 {
		t.Fatalf("erased %d rows, want the 3 of acme and the 1 of beta", n)
	}
	if steps, _ := Trail(ctx, pool, rotated, "acme", "", ana); len(steps) != 0 {
		t.Fatalf("the erased person is still found: %+v", steps)
	}
	if steps, _ := Trail(ctx, pool, rotated, "acme", "", "bo@example.com"); len(steps) != 1 {
		t.Fatalf("someone else's trail: %+v", steps)
	}
	rep, err := testChain.Verify(ctx, pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() || rep.Erased != 4 {
		t.Fatalf("after erasure: %+v", rep)
	}
}
