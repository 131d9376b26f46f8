package auditor

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestEventTheDatabaseRefusesDoesNotStallTheLog: a newer producer's event that PostgreSQL
// cannot store (a NUL escape in a field, which jsonb refuses) goes to the DLQ with the
// SQLSTATE, and the events around it are chained: the audit log never stops behind it.
func TestEventTheDatabaseRefusesDoesNotStallTheLog(t *testing.T) {
	ctx := context.Background()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	_, err := platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "streams")
	bodies := []string{
		`{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","code_seq":1,"attempts":1,"verified_at":"2026-11-26T10:03:00Z"}`,
		`{"challenge_id":"c-2","tenant":"acme","request_id":"r-2","code_seq":1,"attempts":1,"verified_at":"2026-11-26T10:03:00Z","note":"a\u0000b"}`,
		`{"challenge_id":"c-3","tenant":"acme","request_id":"r-3","code_seq":1,"attempts":1,"verified_at":"2026-11-26T10:03:00Z"}`,
	}
	for i, b := range bodies {
		m, err := events.NewMsg(events.TypeVerified, "acme", fmt.Sprintf("p-%d", i), "", jsonRaw(b), events.Envelope{Source: "newer"})
		testenv.Must(t, err, "msg")
		_, err = js.PublishMsg(ctx, m)
		testenv.Must(t, err, "publish")
	}
	live := testenv.Postgres(t, Spec())
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ, BatchSize: 10}, live, js, testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "auditor")
	testenv.Start(t, svc.Run)

	dl := testenv.WaitMessages(t, js, events.StreamDLQ, "otp.dlq.acme", 1, 15*time.Second)
	orig := testenv.OpenDeadLetter(t, testDLQ, dl[0])
	if r := dl[0].Header.Get(events.HeaderDLQReason); !strings.Contains(r, "SQLSTATE 22") || !strings.Contains(string(orig.Data), "c-2") {
		t.Fatalf("dead letter %s, reason %q", orig.Data, r)
	}
	testenv.Eventually(t, 10*time.Second, "the two good events chained", func() bool { return len(payloads(t, live)) == 2 })
	rep, err := testChain.Verify(ctx, live)
	testenv.Must(t, err, "verify")
	if rep.Rows != 2 {
		t.Fatalf("verify: %+v", rep)
	}
}
