package platform_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNATSPermissionsReplyReflection: a tenant app chooses the reply subject of what it
// publishes, and the answer (the JetStream publish acknowledgement, the verifier's reply)
// is published onto it by someone else. Subject permissions cannot stop that, so each app
// lives in its own account and reaches OTPFLOW only through service imports: the answer
// goes back into the app's account, never onto an OTPFLOW subject a stream stores. The
// test aims those answers at other tenants' and the pipeline's subjects and asserts that
// no stream stored a message on any of them.
func TestNATSPermissionsReplyReflection(t *testing.T) {
	d := testenv.DeployedNATS(t)
	provisionAsAdmin(t, d)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	acme, verifier, admin := connectAs(t, d, "acme"), connectAs(t, d, "verifier"), connectAs(t, d, "admin")
	issuer := connectAs(t, d, "issuer")
	jsPublish(ctx, t, issuer, "otp.issued.acme") // something on OTP_EVENTS a purge would remove

	svc, err := micro.AddService(verifier.nc, micro.Config{Name: "otp-verifier", Version: "0.0.0"})
	testenv.Must(t, err, "verify service")
	testenv.Must(t, svc.AddEndpoint("verify", micro.HandlerFunc(func(r micro.Request) {
		_ = r.RespondJSON(events.VerifyReply{Status: "not_found"})
	}), micro.WithEndpointSubject(events.TypeVerify.Wildcard())), "verify endpoint")
	t.Cleanup(func() { _ = svc.Stop() })

	targets := []string{"otp.requested.globex", "otp.issued.globex", "otp.erasure_requested.globex",
		"otp.verified.globex", "otp.dispatch.globex", "otp.challenge.globex"}
	streams := []string{events.StreamRequests, events.StreamEvents, events.StreamDispatch, events.StreamChallenges}
	stored := func() map[string]uint64 {
		got := map[string]uint64{}
		for _, name := range streams {
			st, err := admin.js.Stream(ctx, name)
			testenv.Must(t, err, "stream %s", name)
			info, err := st.Info(ctx, jetstream.WithSubjectFilter("otp.*.globex"))
			testenv.Must(t, err, "info %s", name)
			for subj, n := range info.State.Subjects {
				got[name+" "+subj] += n
			}
		}
		return got
	}
	before := stored()

	send := func(subject, reply string) {
		t.Helper()
		testenv.Must(t, acme.nc.PublishMsg(&nats.Msg{Subject: subject, Reply: reply, Data: []byte(`{"request_id":"x","code":"123456"}`)}), "publish")
		testenv.Must(t, acme.nc.Flush(), "flush")
	}
	for _, reply := range targets {
		send("otp.requested.acme", reply) // the stream's acknowledgement
		send("otp.verify.acme", reply)    // the verifier's reply
	}
	// Each of the above is answered; wait until an answer of the same kind arrived where
	// acme may listen, so the reflected ones have been delivered too.
	if _, err := acme.js.Publish(ctx, "otp.requested.acme", []byte(`{}`)); err != nil {
		t.Fatalf("acme publishes its request: %v", err)
	}
	if _, err := acme.nc.Request("otp.verify.acme", []byte(`{}`), 2*time.Second); err != nil {
		t.Fatalf("acme asks otp.verify.acme: %v", err)
	}
	// Answers aimed at the JetStream API, with the account's rights (the API ignores a
	// request without a reply subject, so these hold on the one-account template too).
	for _, reply := range []string{"$JS.API.STREAM.PURGE.OTP_EVENTS", "$JS.API.CONSUMER.DELETE.OTP_REQUESTS.issuer"} {
		send("otp.requested.acme", reply)
		send("otp.verify.acme", reply)
	}
	time.Sleep(300 * time.Millisecond)
	if st, err := admin.js.Stream(ctx, events.StreamEvents); err != nil || st.CachedInfo().State.Msgs == 0 {
		t.Errorf("OTP_EVENTS after answers aimed at its purge: %v, err %v", st, err)
	}
	if _, err := admin.js.Consumer(ctx, events.StreamRequests, events.ConsumerIssuer); err != nil {
		t.Errorf("the issuer consumer after answers aimed at its deletion: %v", err)
	}

	after := stored()
	for k, n := range after {
		if n != before[k] {
			t.Errorf("%s: %d messages stored, %d before: acme's reply subject put a message there", k, n, before[k])
		}
	}
	t.Logf("stored on otp.*.globex before %v, after %v", before, after)
}
