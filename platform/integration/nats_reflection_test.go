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
// publishes, and the answer (the JetStream publish acknowledgement, the verifier's replies)
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
	testenv.Must(t, svc.AddEndpoint("status", micro.HandlerFunc(func(r micro.Request) {
		_ = r.RespondJSON(events.StatusReply{RequestID: "x"})
	}), micro.WithEndpointSubject(events.TypeStatus.Wildcard())), "status endpoint")
	t.Cleanup(func() { _ = svc.Stop() })
	testenv.Must(t, verifier.nc.Flush(), "the verify service's subscription reached the server")

	targets := []string{"otp.requested.globex", "otp.issued.globex", "otp.erasure_requested.globex",
		"otp.verified.globex", "otp.dispatch.globex", "otp.challenge.globex"}
	stored := func() map[string]uint64 {
		return storedOnGlobex(ctx, t, admin, events.StreamRequests, events.StreamEvents, events.StreamDispatch, events.StreamChallenges)
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
		send("otp.status.acme", reply)    // and its status reply
	}
	// Each of the above is answered; wait until an answer of the same kind arrived where
	// acme may listen, so the reflected ones have been delivered too.
	if _, err := acme.js.Publish(ctx, "otp.requested.acme", []byte(`{}`)); err != nil {
		t.Fatalf("acme publishes its request: %v", err)
	}
	if _, err := acme.nc.Request("otp.verify.acme", []byte(`{}`), 2*time.Second); err != nil {
		t.Fatalf("acme asks otp.verify.acme: %v", err)
	}
	if _, err := acme.nc.Request("otp.status.acme", []byte(`{}`), 2*time.Second); err != nil {
		t.Fatalf("acme asks otp.status.acme: %v", err)
	}
	after := stored()
	for k, n := range after {
		if n != before[k] {
			t.Errorf("%s: %d messages stored, %d before: acme's reply subject put a message there", k, n, before[k])
		}
	}
	t.Logf("stored on otp.*.globex before %v, after %v", before, after)
}

// TestNATSIdentitiesCannotAimDeliveries: every identity that reads a stream chooses the
// reply subject the server delivers to — a pull from a durable, a direct get, a message
// get — and no permission sees it. In one account the issuer could pull OTP_REQUESTS with
// the reply otp.verified.globex and have the request stored on OTP_EVENTS as a
// verification. With the streams in an account of their own, reached through imports,
// what is delivered lands in the reader's own account, where only the subjects it imports
// (those it may publish anyway) lead anywhere. The test aims each reader's deliveries at
// subjects it may not publish and asserts that no stream stored anything there.
func TestNATSIdentitiesCannotAimDeliveries(t *testing.T) {
	d := testenv.DeployedNATS(t)
	provisionAsAdmin(t, d)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	acme, admin := connectAs(t, d, "acme"), connectAs(t, d, "admin")
	issuer, dispatcher, verifier := connectAs(t, d, "issuer"), connectAs(t, d, "dispatcher"), connectAs(t, d, "verifier")
	auditor, operator := connectAs(t, d, "auditor"), connectAs(t, d, "operator")
	for range 6 {
		jsPublish(ctx, t, acme, "otp.requested.acme")
		jsPublish(ctx, t, issuer, "otp.dispatch.acme")
		jsPublish(ctx, t, issuer, "otp.challenge.acme")
		jsPublish(ctx, t, issuer, "otp.issued.acme")
	}
	jsPublish(ctx, t, auditor, events.SubjectAuditCheckpoint)

	stored := func() map[string]uint64 {
		return storedOnGlobex(ctx, t, admin, events.StreamRequests, events.StreamEvents, events.StreamDispatch,
			events.StreamChallenges, events.StreamDLQ, events.StreamAudit)
	}
	before := stored()

	prefix := testenv.DeployJSAPIPrefix + "."
	// pull asks durable of stream for one message delivered to reply, then pulls one for
	// itself and waits for it: a consumer serves pull requests in order, so the aimed one
	// was served (its message delivered, or dropped for want of interest) before.
	pull := func(c *identityConn, stream, durable, reply string) {
		t.Helper()
		testenv.Must(t, c.nc.PublishRequest(prefix+"CONSUMER.MSG.NEXT."+stream+"."+durable, reply, []byte(`{"batch":1}`)), "pull")
		cons, err := c.js.Consumer(ctx, stream, durable)
		testenv.Must(t, err, "%s: bind %s", c.id, durable)
		fetched, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		testenv.Must(t, err, "%s: fetch from %s", c.id, durable)
		n := 0
		for range fetched.Messages() {
			n++
		}
		if n != 1 {
			t.Fatalf("%s: fetched %d messages from %s, want 1 (%v)", c.id, n, durable, fetched.Error())
		}
		must(t, c.noViolation(prefix+"CONSUMER.MSG.NEXT."+stream+"."+durable))
		t.Logf("%s pulled %s/%s with the reply %s", c.id, stream, durable, reply)
	}
	// get asks for messages of stream (api: DIRECT.GET or STREAM.MSG.GET) delivered to
	// reply, then asks the same for itself and waits for the answer: the server answers a
	// stream's gets in order, so the first answer went out before the second.
	get := func(c *identityConn, api, stream, body, reply string) {
		t.Helper()
		subject := prefix + api + "." + stream
		testenv.Must(t, c.nc.PublishRequest(subject, reply, []byte(body)), "get")
		if _, err := c.nc.Request(subject, []byte(body), 5*time.Second); err != nil {
			t.Fatalf("%s: %s answered nothing: %v", c.id, subject, err)
		}
		must(t, c.noViolation(subject))
		t.Logf("%s asked %s with the reply %s", c.id, subject, reply)
	}

	pull(issuer, events.StreamRequests, events.IssuerTenantConsumer("acme").Durable, "otp.verified.globex")
	pull(issuer, events.StreamRequests, events.IssuerTenantConsumer("acme").Durable, "otp.requested.globex")
	pull(dispatcher, events.StreamDispatch, events.ConsumerDispatcher, "otp.issued.globex")
	pull(dispatcher, events.StreamDispatch, events.ConsumerDispatcher, "otp.requested.globex")
	pull(verifier, events.StreamChallenges, events.ConsumerVerifier, "otp.challenge.globex")
	pull(verifier, events.StreamChallenges, events.ConsumerVerifier, "otp.dispatch.globex")
	pull(auditor, events.StreamEvents, events.ConsumerAuditor, "otp.verified.globex")
	pull(auditor, events.StreamEvents, events.ConsumerAuditor, "otp.erasure_requested.globex")
	get(auditor, "DIRECT.GET", events.StreamEvents, `{"seq":1,"batch":5}`, "otp.requested.globex")
	get(auditor, "STREAM.MSG.GET", events.StreamAudit, `{"seq":1}`, "otp.dispatch.globex")
	get(operator, "DIRECT.GET", events.StreamEvents, `{"seq":1,"batch":5}`, "otp.verified.globex")
	get(operator, "STREAM.MSG.GET", events.StreamRequests, `{"seq":1}`, "otp.dispatch.globex")
	get(operator, "STREAM.MSG.GET", events.StreamChallenges, `{"seq":1}`, "otp.requested.globex")

	// A stream stores what reaches it in order: once a message published after the
	// aimed deliveries is acknowledged by each stream, anything they sent there is stored.
	jsPublish(ctx, t, acme, "otp.requested.acme")
	jsPublish(ctx, t, issuer, "otp.issued.acme")
	jsPublish(ctx, t, issuer, "otp.dispatch.acme")
	jsPublish(ctx, t, issuer, "otp.challenge.acme")
	jsPublish(ctx, t, issuer, "otp.dlq.acme")
	jsPublish(ctx, t, auditor, events.SubjectAuditCheckpoint)

	after := stored()
	for k, n := range after {
		if n != before[k] {
			t.Errorf("%s: %d messages stored, %d before: a delivery aimed there was stored", k, n, before[k])
		}
	}
	t.Logf("stored on otp.*.globex before %v, after %v", before, after)
}

// storedOnGlobex counts, as the admin sees them, the messages each of streams holds on
// tenant globex's subjects (otp.*.globex), by "<stream> <subject>".
func storedOnGlobex(ctx context.Context, t *testing.T, admin *identityConn, streams ...string) map[string]uint64 {
	t.Helper()
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
