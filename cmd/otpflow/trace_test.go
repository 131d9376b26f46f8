package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// spansNamed returns the ended spans whose name starts with prefix, in end order.
func spansNamed(rec *tracetest.SpanRecorder, prefix string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if strings.HasPrefix(s.Name(), prefix) {
			out = append(out, s)
		}
	}
	return out
}

// TestOneTraceAcrossTheServices: an app publishes one otp.requested with its traceparent;
// with SES down, the mail goes out through the SMTP relay. Every span of it is in the
// app's trace, each the child of the one before: the issuer's "issue" span of the app's
// span, the dispatcher's job span of the issue span (the dispatch job carries its
// traceparent), and each provider attempt of the job span, one per attempt the delivery
// event reports. A verify sent with a traceparent of another trace continues that trace,
// links to the issue span, and publishes otp.verified in it; the auditor chains each event
// in a span under its publisher's. No span carries the address or the code.
func TestOneTraceAcrossTheServices(t *testing.T) {
	w := newWorld(t)
	w.useSES(t).SetFault(sestest.Always(sestest.Unavailable))
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	testenv.Start(t, func(ctx context.Context) error {
		return runPipeline(platform.WithTracerProvider(ctx, tp), w.getenv, &testenv.LogBuffer{})
	})
	a := newApp(t, w.nats.ClientURL())

	const appTrace, appSpan = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	const rcpt = "trace@example.com"
	m := nats.NewMsg("otp.requested.acme")
	m.Data = fmt.Appendf(nil, `{"request_id":"trace-1","recipient":%q,"purpose":"login"}`, rcpt)
	m.Header.Set(events.HeaderTraceParent, "00-"+appTrace+"-"+appSpan+"-01")
	testenv.Eventually(t, 20*time.Second, "the request published", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := a.js.PublishMsg(ctx, m)
		return err == nil
	})
	mail := w.smtp.WaitFor(t, 1, 30*time.Second)[0]
	code := codeOf(t, mail)
	testenv.Eventually(t, 30*time.Second, "otp.delivered", func() bool { return count(t, a.js, "otp.delivered.acme") == 1 })
	testenv.Eventually(t, 10*time.Second, "the dispatch span", func() bool { return len(spansNamed(rec, "dispatch")) == 1 })

	issues := spansNamed(rec, "issue")
	if len(issues) != 1 {
		t.Fatalf("%d issue spans, want 1", len(issues))
	}
	issue := issues[0]
	if got := issue.SpanContext().TraceID().String(); got != appTrace {
		t.Fatalf("issue span in trace %s, want the app's %s", got, appTrace)
	}
	if p := issue.Parent(); p.SpanID().String() != appSpan || !p.IsRemote() {
		t.Errorf("issue span's parent = %s (remote %v), want the app's span %s", p.SpanID(), p.IsRemote(), appSpan)
	}
	if issue.SpanKind() != trace.SpanKindConsumer {
		t.Errorf("issue span kind = %v", issue.SpanKind())
	}
	// What the issuer published carries the issue span's traceparent as it is.
	issueTP := "00-" + appTrace + "-" + issue.SpanContext().SpanID().String() + "-01"
	for _, subj := range []string{"otp.issued.acme"} {
		msgs := testenv.Messages(t, a.js, events.StreamEvents, subj)
		if len(msgs) != 1 || msgs[0].Header.Get(events.HeaderTraceParent) != issueTP {
			t.Errorf("%s traceparent: want %s, got %v", subj, issueTP, msgs)
		}
	}

	dispatch := spansNamed(rec, "dispatch")[0]
	if dispatch.SpanContext().TraceID().String() != appTrace || dispatch.Parent().SpanID() != issue.SpanContext().SpanID() {
		t.Errorf("dispatch span in trace %s under %s, want the app's trace under the issue span %s",
			dispatch.SpanContext().TraceID(), dispatch.Parent().SpanID(), issue.SpanContext().SpanID())
	}

	// One span per provider call the delivery event reports, in order, each a child of the job's.
	delivered := eventsOf[events.Delivered](t, a.js, "otp.delivered.acme")[0]
	attempts := spansNamed(rec, "provider ")
	if len(attempts) != len(delivered.ProviderAttempts) || len(attempts) < 2 {
		t.Fatalf("%d provider spans, the event reports %d attempts (want at least 2: SES down, then SMTP): %+v",
			len(attempts), len(delivered.ProviderAttempts), delivered.ProviderAttempts)
	}
	t.Logf("provider attempts: %+v", delivered.ProviderAttempts)
	for i, s := range attempts {
		want := delivered.ProviderAttempts[i]
		attrs := map[string]string{}
		for _, kv := range s.Attributes() {
			attrs[string(kv.Key)] = kv.Value.String()
		}
		if s.Name() != "provider "+want.Provider || attrs["otpflow.provider"] != want.Provider || attrs["otpflow.provider.outcome"] != want.Outcome {
			t.Errorf("attempt %d: span %q %v, want provider %s outcome %s", i, s.Name(), attrs, want.Provider, want.Outcome)
		}
		if s.SpanContext().TraceID().String() != appTrace || s.Parent().SpanID() != dispatch.SpanContext().SpanID() {
			t.Errorf("attempt %d (%s) is not a child of the dispatch span", i, s.Name())
		}
		if failed := want.Outcome != "ok"; failed != (s.Status().Code == codes.Error) {
			t.Errorf("attempt %d: outcome %s, span status %v", i, want.Outcome, s.Status())
		}
	}
	if first, last := delivered.ProviderAttempts[0], delivered.ProviderAttempts[len(attempts)-1]; first.Provider != "ses" || last.Provider != "smtp" || last.Outcome != "ok" {
		t.Errorf("attempts %+v, want SES failing first and SMTP delivering last", delivered.ProviderAttempts)
	}
	if m := testenv.Messages(t, a.js, events.StreamEvents, "otp.delivered.acme"); m[0].Header.Get(events.HeaderTraceParent) !=
		"00-"+appTrace+"-"+dispatch.SpanContext().SpanID().String()+"-01" {
		t.Errorf("otp.delivered traceparent %s is not the dispatch span's", m[0].Header.Get(events.HeaderTraceParent))
	}

	// The app verifies in a trace of its own (a later user action): the verify span continues
	// it, and links back to the issuance.
	const verifyTrace, verifySpan = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
	vm := nats.NewMsg("otp.verify.acme")
	vm.Data, _ = json.Marshal(map[string]string{"request_id": "trace-1", "code": code})
	vm.Header.Set(events.HeaderTraceParent, "00-"+verifyTrace+"-"+verifySpan+"-01")
	var reply events.VerifyReply
	testenv.Eventually(t, 20*time.Second, "a verify reply", func() bool {
		r, err := a.nc.RequestMsg(vm, 5*time.Second)
		return err == nil && json.Unmarshal(r.Data, &reply) == nil
	})
	if reply.Status != events.StatusVerified {
		t.Fatalf("verify: %+v", reply)
	}
	testenv.Eventually(t, 10*time.Second, "the verify span", func() bool { return len(spansNamed(rec, "verify")) == 1 })
	verify := spansNamed(rec, "verify")[0]
	if verify.SpanContext().TraceID().String() != verifyTrace || verify.Parent().SpanID().String() != verifySpan {
		t.Errorf("verify span in trace %s under %s, want the verify request's trace %s under %s",
			verify.SpanContext().TraceID(), verify.Parent().SpanID(), verifyTrace, verifySpan)
	}
	if links := verify.Links(); len(links) != 1 || links[0].SpanContext.TraceID().String() != appTrace ||
		links[0].SpanContext.SpanID() != issue.SpanContext().SpanID() {
		t.Errorf("verify span links %+v, want one to the issue span %s of trace %s", links, issue.SpanContext().SpanID(), appTrace)
	}

	// otp.verified is published in the verify's trace, and the auditor chains each event in
	// the span of its publisher: the issuance, the delivery and the verify.
	verifyTP := "00-" + verifyTrace + "-" + verify.SpanContext().SpanID().String() + "-01"
	// The reply comes at the commit and the event is published after it, so wait for it.
	if m := testenv.WaitMessages(t, a.js, events.StreamEvents, "otp.verified.acme", 1, 10*time.Second); len(m) != 1 || m[0].Header.Get(events.HeaderTraceParent) != verifyTP {
		t.Errorf("otp.verified: want traceparent %s, got %v", verifyTP, m)
	}
	audited := func(parent trace.SpanContext) bool {
		for _, s := range spansNamed(rec, "audit") {
			if s.Parent().SpanID() == parent.SpanID() && s.SpanContext().TraceID() == parent.TraceID() {
				return true
			}
		}
		return false
	}
	testenv.Eventually(t, 30*time.Second, "audit spans under issue, dispatch and verify", func() bool {
		return audited(issue.SpanContext()) && audited(dispatch.SpanContext()) && audited(verify.SpanContext())
	})

	// The spans say which request and which provider, never to whom or with which code.
	for _, s := range rec.Ended() {
		for _, kv := range s.Attributes() {
			if v := kv.Value.String(); strings.Contains(v, rcpt) || strings.Contains(v, code) {
				t.Errorf("span %s attribute %s carries the address or the code", s.Name(), kv.Key)
			}
		}
		if strings.Contains(s.Status().Description, rcpt) {
			t.Errorf("span %s status carries the address", s.Name())
		}
	}
}
