package platform_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNATSPermissions starts the server of deploy/nats (rendered with keys and a CA made
// here, over TLS) and shows, for every identity, that what it needs works and that what
// it must not do is refused by the server: each refusal is the server's permissions
// violation naming the exact subject (nats.ErrPermissionViolation), and the call gets no
// answer (a JetStream publish no acknowledgement, a request or API call nats.ErrTimeout; a
// subscription reports the violation itself). The refusals tried are listed in
// deploy/nats/README.md.
func TestNATSPermissions(t *testing.T) {
	d := testenv.DeployedNATS(t)
	provisionAsAdmin(t, d)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	acme, globex := connectAs(t, d, "acme"), connectAs(t, d, "globex")
	issuer, dispatcher := connectAs(t, d, "issuer"), connectAs(t, d, "dispatcher")
	verifier, auditor := connectAs(t, d, "verifier"), connectAs(t, d, "auditor")
	operator, admin := connectAs(t, d, "operator"), connectAs(t, d, "admin")
	system := connectAs(t, d, "system")

	// The verifier serves otp.verify.* and otp.status.* as the micro service does.
	svc, err := micro.AddService(verifier.nc, micro.Config{Name: "otp-verifier", Version: "0.0.0"})
	testenv.Must(t, err, "verify service")
	testenv.Must(t, svc.AddEndpoint("verify", micro.HandlerFunc(func(r micro.Request) {
		_ = r.Respond([]byte(`{"status":"not_found","subject":"` + r.Subject() + `"}`))
	}), micro.WithEndpointSubject(events.TypeVerify.Wildcard())), "verify endpoint")
	testenv.Must(t, svc.AddEndpoint("status", micro.HandlerFunc(func(r micro.Request) {
		_ = r.Respond([]byte(`{"request_id":"r1","found":false,"subject":"` + r.Subject() + `"}`))
	}), micro.WithEndpointSubject(events.TypeStatus.Wildcard())), "status endpoint")
	t.Cleanup(func() { _ = svc.Stop() })
	must(t, verifier.noViolation(events.TypeVerify.Wildcard()))
	must(t, verifier.noViolation(events.TypeStatus.Wildcard()))
	must(t, verifier.noViolation("$SRV.PING"))

	// The pipeline's first hops, each as its own identity.
	t.Run("app acme", func(t *testing.T) {
		ack := jsPublish(ctx, t, acme, "otp.requested.acme")
		if ack.Stream != events.TenantRequestsStream("acme") {
			t.Fatalf("acked by %s", ack.Stream)
		}
		// The tenant's request stream stores no message above what a request can need.
		if _, err := acme.js.Publish(ctx, "otp.requested.acme", make([]byte, events.RequestsMaxMsgSize+1)); err == nil || !strings.Contains(err.Error(), "maximum") {
			t.Fatalf("a request of %d bytes: %v, want refused", events.RequestsMaxMsgSize+1, err)
		}
		reply, err := acme.nc.Request("otp.verify.acme", []byte(`{"request_id":"r1","code":"123456"}`), 2*time.Second)
		testenv.Must(t, err, "acme asks otp.verify.acme")
		if !strings.Contains(string(reply.Data), `"subject":"otp.verify.acme"`) || !strings.HasPrefix(reply.Subject, "_INBOX_acme.") {
			t.Fatalf("reply %q on %s", reply.Data, reply.Subject)
		}
		reply, err = acme.nc.Request("otp.status.acme", []byte(`{"request_id":"r1"}`), 2*time.Second)
		testenv.Must(t, err, "acme asks otp.status.acme")
		if !strings.Contains(string(reply.Data), `"subject":"otp.status.acme"`) || !strings.HasPrefix(reply.Subject, "_INBOX_acme.") {
			t.Fatalf("status reply %q on %s", reply.Data, reply.Subject)
		}
	})
	t.Run("app globex", func(t *testing.T) {
		jsPublish(ctx, t, globex, "otp.requested.globex")
		_, err := globex.nc.Request("otp.verify.globex", []byte(`{}`), 2*time.Second)
		testenv.Must(t, err, "globex asks otp.verify.globex")
		reply, err := globex.nc.Request("otp.status.globex", []byte(`{"request_id":"r1"}`), 2*time.Second)
		testenv.Must(t, err, "globex asks otp.status.globex")
		if !strings.Contains(string(reply.Data), `"subject":"otp.status.globex"`) {
			t.Fatalf("status reply %q", reply.Data)
		}
	})

	t.Run("issuer", func(t *testing.T) {
		// A durable per tenant (events.IssuerConsumers), each holding its tenant's request.
		want := events.IssuerConsumers([]string{"acme", "globex"})
		for _, cc := range want {
			cons, err := issuer.js.Consumer(ctx, events.StreamRequests, cc.Durable)
			testenv.Must(t, err, "bind to the issuer consumer %s", cc.Durable)
			fetchAck(t, cons, 1)
		}
		// The names of OTP_REQUESTS's consumers (durables provisioning takes it off).
		left, err := platform.IssuerLeftovers(ctx, issuer.js, want[:1])
		if err != nil || len(left) != 1 || left[0].Durable != "issuer_globex" {
			t.Fatalf("the issuer's other durables: %v, %v", left, err)
		}
		_, err = issuer.js.Stream(ctx, events.StreamRequests)
		testenv.Must(t, err, "OTP_REQUESTS info (backlog watch)")
		// Whether each tenant's requests reach OTP_REQUESTS (platform.SourceWatch).
		ages, err := (&platform.SourceWatch{JS: issuer.js}).Check(ctx)
		if err != nil || len(ages) != 2 {
			t.Fatalf("the issuer's check of the tenant streams: %v, %v", ages, err)
		}
		jsPublish(ctx, t, issuer, "otp.dispatch.acme")
		jsPublish(ctx, t, issuer, "otp.challenge.acme")
		jsPublish(ctx, t, issuer, "otp.challenge_superseded.acme")
		jsPublish(ctx, t, issuer, "otp.issued.acme")
		jsPublish(ctx, t, issuer, "otp.rejected.acme")
		jsPublish(ctx, t, issuer, "otp.alert._system")
		jsPublish(ctx, t, issuer, "otp.dlq.acme")
		_, err = issuer.js.Consumer(ctx, events.StreamEvents, "issuer-erasure")
		testenv.Must(t, err, "bind to issuer-erasure")

	})

	t.Run("dispatcher", func(t *testing.T) {
		cons, err := dispatcher.js.Consumer(ctx, events.StreamDispatch, events.ConsumerDispatcher)
		testenv.Must(t, err, "bind to the dispatcher consumer")
		fetchAck(t, cons, 1)
		jsPublish(ctx, t, dispatcher, "otp.delivered.acme")
		jsPublish(ctx, t, dispatcher, "otp.delivery_failed.acme")
		jsPublish(ctx, t, dispatcher, "otp.dispatch_expired.acme")
		jsPublish(ctx, t, dispatcher, "otp.feedback.acme") // SES feedback (OTP_SES_FEEDBACK_QUEUE_URL)
		jsPublish(ctx, t, dispatcher, "otp.erased.acme")

	})

	// The issuer suppresses recipients on the feedback the dispatcher just published.
	t.Run("issuer feedback", func(t *testing.T) {
		cons, err := issuer.js.Consumer(ctx, events.StreamEvents, events.IssuerFeedbackConsumer.Durable)
		testenv.Must(t, err, "bind to issuer-feedback")
		fetchAck(t, cons, 1)
	})

	t.Run("verifier", func(t *testing.T) {
		cons, err := verifier.js.Consumer(ctx, events.StreamChallenges, events.ConsumerVerifier)
		testenv.Must(t, err, "bind to the verifier consumer")
		fetchAck(t, cons, 2)
		st, err := verifier.js.Stream(ctx, events.StreamChallenges)
		testenv.Must(t, err, "OTP_CHALLENGES info")
		_, err = st.GetLastMsgForSubject(ctx, "otp.challenge.acme")
		testenv.Must(t, err, "last challenge of acme")
		_, err = verifier.js.Consumer(ctx, events.StreamEvents, events.ConsumerVerifier)
		testenv.Must(t, err, "bind to the legacy verifier consumer")
		// The status projection reads what the issuer and the dispatcher published.
		status, err := verifier.js.Consumer(ctx, events.StreamEvents, events.VerifierStatusConsumer.Durable)
		testenv.Must(t, err, "bind to verifier-status")
		fetchAck(t, status, 2)
		jsPublish(ctx, t, verifier, "otp.verified.acme")
		jsPublish(ctx, t, verifier, "otp.verify_failed.acme")
		jsPublish(ctx, t, verifier, "otp.locked.acme")

	})

	t.Run("auditor", func(t *testing.T) {
		cons, err := auditor.js.Consumer(ctx, events.StreamEvents, events.ConsumerAuditor)
		testenv.Must(t, err, "bind to the auditor consumer")
		fetchAck(t, cons, 1)
		jsPublish(ctx, t, auditor, events.SubjectAuditCheckpoint)
		jsPublish(ctx, t, auditor, "otp.alert.acme")
		st, err := auditor.js.Stream(ctx, events.StreamAudit)
		testenv.Must(t, err, "OTP_AUDIT info")
		_, err = st.GetMsg(ctx, 1)
		testenv.Must(t, err, "a checkpoint")
		readInOrder(ctx, t, auditor, "")

	})

	t.Run("operator", func(t *testing.T) {
		who, err := operator.nc.Request("$SYS.REQ.USER.INFO", nil, 2*time.Second)
		testenv.Must(t, err, "who am I")
		if !strings.Contains(string(who.Data), d.Pubs["operator"]) {
			t.Fatalf("$SYS.REQ.USER.INFO answered %s", who.Data)
		}
		// What `otpflow erase` does: read and delete one message of the tenant's request
		// stream and of OTP_REQUESTS (which sources it), ask for the erasure, read the
		// answers in order, record the action.
		own, err := operator.js.Stream(ctx, events.TenantRequestsStream("acme"))
		testenv.Must(t, err, "OTP_REQUESTS_acme info")
		_, err = own.GetMsg(ctx, 1)
		testenv.Must(t, err, "read a request of acme's stream")
		testenv.Must(t, own.SecureDeleteMsg(ctx, 1), "erase a request of acme's stream")
		st, err := operator.js.Stream(ctx, events.StreamRequests)
		testenv.Must(t, err, "OTP_REQUESTS info")
		testenv.Eventually(t, 10*time.Second, "acme's request sourced into OTP_REQUESTS", func() bool {
			_, err = st.GetMsg(ctx, 1)
			return err == nil
		})
		testenv.Must(t, st.SecureDeleteMsg(ctx, 1), "erase a request")
		dlq, err := operator.js.Stream(ctx, events.StreamDLQ)
		testenv.Must(t, err, "OTP_DLQ info")
		_, err = dlq.GetMsg(ctx, 1)
		testenv.Must(t, err, "read a dead letter")
		for _, name := range []string{events.ConsumerAuditor, "issuer-erasure", "dispatcher-erasure", "verifier-erasure"} {
			_, err = operator.js.Consumer(ctx, events.StreamEvents, name)
			testenv.Must(t, err, "how far %s got (audit verify, erase)", name)
		}
		jsPublish(ctx, t, operator, "otp.erasure_requested.acme")
		jsPublish(ctx, t, operator, "otp.operator_action._system")
		// What `otpflow dlq redrive` does: publish a dead request again under a new id,
		// then delete the entry.
		for _, subject := range []string{"otp.requested.acme"} {
			m := nats.NewMsg(subject)
			m.Data = []byte(`{}`)
			m.Header.Set(jetstream.MsgIDHeader, "redrive:1:"+subject)
			m.Header.Set(events.HeaderRedriveOf, subject)
			if _, err := operator.js.PublishMsg(ctx, m); err != nil {
				t.Fatalf("operator may redrive to %s: %v (errors: %v)", subject, err, operator.seen())
			}
		}
		testenv.Must(t, dlq.SecureDeleteMsg(ctx, 1), "drop a dead letter")
		readInOrder(ctx, t, operator, "otp.erased.acme")
		readInOrder(ctx, t, operator, "")

	})

	t.Run("admin", func(t *testing.T) {
		_, err := admin.js.CreateStream(ctx, jetstream.StreamConfig{Name: "SCRATCH", Subjects: []string{"scratch.>"}})
		testenv.Must(t, err, "admin creates a stream")
		_, err = admin.js.CreateOrUpdateConsumer(ctx, "SCRATCH", jetstream.ConsumerConfig{Durable: "d"})
		testenv.Must(t, err, "admin creates a consumer")
		testenv.Must(t, admin.js.DeleteConsumer(ctx, "SCRATCH", "d"), "admin deletes a consumer")
		testenv.Must(t, admin.js.DeleteStream(ctx, "SCRATCH"), "admin deletes a stream")
		_, err = admin.js.AccountInfo(ctx)
		testenv.Must(t, err, "account info")

	})

	t.Run("system", func(t *testing.T) {
		m, err := system.nc.Request("$SYS.REQ.SERVER.PING.JSZ", []byte(`{}`), 2*time.Second)
		testenv.Must(t, err, "the monitoring user asks for JetStream's state")
		if !strings.Contains(string(m.Data), "OTPFLOW") && !strings.Contains(string(m.Data), `"streams"`) {
			t.Fatalf("JSZ answered %.200s", m.Data)
		}
	})

	// What each identity must not do, tried for all at once (each refusal waits for
	// the server's error).
	t.Run("refused", func(t *testing.T) {
		t.Run(acme.id, func(t *testing.T) {
			t.Parallel()
			denyPublish(t, acme, "otp.requested.globex")
			denyPublish(t, acme, "otp.issued.acme")
			denyPublish(t, acme, "otp.erasure_requested.acme")
			denySubscribe(t, acme, "otp.>")
			denySubscribe(t, acme, "otp.issued.acme")
			denySubscribe(t, acme, "_INBOX.>")
			denySubscribe(t, acme, "_INBOX_globex.>")
			denySubscribe(t, acme, "otp.verify.*")
			denySubscribe(t, acme, "otp.status.*")
			denyRequest(t, acme, "otp.verify.globex")
			denyRequest(t, acme, "otp.status.globex")
			denyAPI(t, acme, "STREAM.INFO.OTP_EVENTS", `{}`)
			denyAPI(t, acme, "STREAM.MSG.GET.OTP_EVENTS", `{"seq":1}`)
			denyAPI(t, acme, "CONSUMER.CREATE.OTP_EVENTS.spy", `{"stream_name":"OTP_EVENTS","config":{"name":"spy","ack_policy":"none"}}`)
			denyAPI(t, acme, "CONSUMER.MSG.NEXT.OTP_EVENTS.auditor", `{"batch":1}`)
			denyAPI(t, acme, "CONSUMER.MSG.NEXT.OTP_EVENTS.verifier-status", `{"batch":1}`)
			denyAPI(t, acme, "STREAM.INFO.OTP_REQUESTS", `{}`)
			denyAPI(t, acme, "CONSUMER.NAMES.OTP_REQUESTS", `{}`)
			denyAPI(t, acme, "STREAM.INFO.OTP_REQUESTS_acme", `{}`)
			denyAPI(t, acme, "STREAM.MSG.GET.OTP_REQUESTS_globex", `{"seq":1}`)
			denyAPI(t, acme, "INFO", ``)
			// Forge the server's word that a request was given up, to have it dead-lettered:
			// refused in its own account, and nothing it publishes reaches the streams'.
			denyPublish(t, acme, "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.OTP_REQUESTS.issuer_acme")
			denyAPI(t, acme, "CONSUMER.MSG.NEXT.OTP_ADVISORIES.issuer-exhausted", `{"batch":1}`)
		})
		t.Run(globex.id, func(t *testing.T) {
			t.Parallel()
			denyPublish(t, globex, "otp.requested.acme")
			denyRequest(t, globex, "otp.verify.acme")
			denyRequest(t, globex, "otp.status.acme")
			denySubscribe(t, globex, "_INBOX_acme.>")
		})
		t.Run(issuer.id, func(t *testing.T) {
			t.Parallel()
			denyPublish(t, issuer, "otp.verified.acme")
			denyPublish(t, issuer, "otp.delivered.acme")
			denyPublish(t, issuer, "otp.feedback.acme") // a forged bounce would suppress a person
			denyPublish(t, issuer, "otp.requested.acme")
			denyPublish(t, issuer, "otp.erasure_requested.acme")
			denySubscribe(t, issuer, "otp.>")
			denySubscribe(t, issuer, "otp.verify.*")
			denySubscribe(t, issuer, "otp.status.*")
			denyAPI(t, issuer, "CONSUMER.MSG.NEXT.OTP_EVENTS.verifier-status", `{"batch":1}`)
			denyAPI(t, issuer, "CONSUMER.DELETE.OTP_EVENTS.issuer-feedback", ``)
			denyAPI(t, issuer, "STREAM.INFO.OTP_DISPATCH", `{}`)
			denyAPI(t, issuer, "CONSUMER.INFO.OTP_DISPATCH.dispatcher", `{}`)
			denyAPI(t, issuer, "CONSUMER.MSG.NEXT.OTP_DISPATCH.dispatcher", `{"batch":1}`)
			denyAPI(t, issuer, "STREAM.MSG.GET.OTP_CHALLENGES", `{"seq":1}`)
			denyAPI(t, issuer, "STREAM.CREATE.OTP_REQUESTS", `{"name":"OTP_REQUESTS","subjects":["otp.requested.*"]}`)
			denyAPI(t, issuer, "STREAM.UPDATE.OTP_REQUESTS", `{"name":"OTP_REQUESTS","subjects":["otp.>"]}`)
			denyAPI(t, issuer, "CONSUMER.CREATE.OTP_REQUESTS.issuer", `{"stream_name":"OTP_REQUESTS","config":{"durable_name":"issuer","ack_policy":"none"}}`)
			denyAPI(t, issuer, "CONSUMER.DELETE.OTP_REQUESTS.issuer", ``)
			denyAPI(t, issuer, "CONSUMER.CREATE.OTP_REQUESTS.issuer_acme", `{"stream_name":"OTP_REQUESTS","config":{"durable_name":"issuer_acme","ack_policy":"explicit","deliver_policy":"new","filter_subject":"otp.requested.acme"}}`)
			denyAPI(t, issuer, "CONSUMER.DELETE.OTP_REQUESTS.issuer_globex", ``)
			denyAPI(t, issuer, "CONSUMER.MSG.NEXT.OTP_REQUESTS.issuer_initech", `{"batch":1}`)
			denyAPI(t, issuer, "STREAM.PURGE.OTP_REQUESTS", `{}`)
			denyAPI(t, issuer, "STREAM.MSG.DELETE.OTP_REQUESTS_acme", `{"seq":1}`)
			denyAPI(t, issuer, "STREAM.PURGE.OTP_REQUESTS_globex", `{}`)
			denyAPI(t, issuer, "STREAM.DELETE.OTP_REQUESTS", ``)
			denySubscribe(t, issuer, "$JS.EVENT.ADVISORY.>")
			denyPublish(t, issuer, "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.OTP_REQUESTS.issuer")
			denyAPI(t, issuer, "CONSUMER.DELETE.OTP_ADVISORIES.issuer-exhausted", ``)
			denyAPI(t, issuer, "STREAM.PURGE.OTP_ADVISORIES", `{}`)
			denyAPI(t, issuer, "CONSUMER.MSG.NEXT.OTP_ADVISORIES.dispatcher-exhausted", `{"batch":1}`)
		})
		t.Run(dispatcher.id, func(t *testing.T) {
			t.Parallel()
			denyPublish(t, dispatcher, "otp.issued.acme")
			denyPublish(t, dispatcher, "otp.dispatch.acme")
			denyPublish(t, dispatcher, "otp.verified.acme")
			denySubscribe(t, dispatcher, "otp.>")
			denyAPI(t, dispatcher, "STREAM.INFO.OTP_CHALLENGES", `{}`)
			denyAPI(t, dispatcher, "STREAM.MSG.GET.OTP_CHALLENGES", `{"seq":1}`)
			denyAPI(t, dispatcher, "CONSUMER.MSG.NEXT.OTP_CHALLENGES.verifier", `{"batch":1}`)
			// It publishes the feedback; taking it off the issuer's durable would keep a
			// bounced address unsuppressed.
			denyAPI(t, dispatcher, "CONSUMER.MSG.NEXT.OTP_EVENTS.issuer-feedback", `{"batch":1}`)
			denyAPI(t, dispatcher, "CONSUMER.INFO.OTP_EVENTS.issuer-feedback", `{}`)
			denyAPI(t, dispatcher, "CONSUMER.MSG.NEXT.OTP_EVENTS.verifier-status", `{"batch":1}`)
			denyAPI(t, dispatcher, "STREAM.INFO.OTP_REQUESTS", `{}`)
			denyAPI(t, dispatcher, "CONSUMER.NAMES.OTP_REQUESTS", `{}`)
			denyAPI(t, dispatcher, "CONSUMER.MSG.NEXT.OTP_ADVISORIES.issuer-exhausted", `{"batch":1}`)
			denyAPI(t, dispatcher, "STREAM.PURGE.OTP_DISPATCH", `{}`)
			denyAPI(t, dispatcher, "STREAM.MSG.DELETE.OTP_EVENTS", `{"seq":1}`)
			denyAPI(t, dispatcher, "CONSUMER.DELETE.OTP_ADVISORIES.dispatcher-exhausted", ``)
			denyAPI(t, dispatcher, "STREAM.DELETE.OTP_DISPATCH", ``)
			denyAPI(t, dispatcher, "CONSUMER.CREATE.OTP_DISPATCH.dispatcher", `{"stream_name":"OTP_DISPATCH","config":{"durable_name":"dispatcher","ack_policy":"none"}}`)
			denyAPI(t, dispatcher, "CONSUMER.DELETE.OTP_DISPATCH.dispatcher", ``)
			denyAPI(t, dispatcher, "STREAM.CREATE.SCRATCH", `{"name":"SCRATCH","subjects":["scratch"]}`)
		})
		t.Run(verifier.id, func(t *testing.T) {
			t.Parallel()
			denyPublish(t, verifier, "otp.dispatch.acme")
			denyPublish(t, verifier, "otp.issued.acme")
			denyPublish(t, verifier, "otp.challenge.acme")
			denyPublish(t, verifier, "_INBOX_acme.unasked") // no request came with that reply
			denySubscribe(t, verifier, "otp.requested.*")
			denySubscribe(t, verifier, "_INBOX_acme.>")
			denyAPI(t, verifier, "STREAM.INFO.OTP_DISPATCH", `{}`)
			denyAPI(t, verifier, "STREAM.MSG.GET.OTP_REQUESTS", `{"seq":1}`)
			denyAPI(t, verifier, "CONSUMER.CREATE.OTP_CHALLENGES.verifier", `{"stream_name":"OTP_CHALLENGES","config":{"durable_name":"verifier","ack_policy":"none"}}`)
			denyAPI(t, verifier, "STREAM.MSG.DELETE.OTP_CHALLENGES", `{"seq":1}`)
			denyAPI(t, verifier, "CONSUMER.DELETE.OTP_CHALLENGES.verifier", ``)
			denyAPI(t, verifier, "CONSUMER.MSG.NEXT.OTP_EVENTS.issuer-feedback", `{"batch":1}`)
			denyAPI(t, verifier, "CONSUMER.DELETE.OTP_EVENTS.verifier-status", ``)
			denyAPI(t, verifier, "CONSUMER.CREATE.OTP_EVENTS.verifier-status", `{"stream_name":"OTP_EVENTS","config":{"durable_name":"verifier-status","ack_policy":"none"}}`)
			denyAPI(t, verifier, "STREAM.DELETE.OTP_CHALLENGES", ``)
			denyAPI(t, verifier, "STREAM.CREATE.SCRATCH", `{"name":"SCRATCH","subjects":["scratch"]}`)
		})
		t.Run(auditor.id, func(t *testing.T) {
			t.Parallel()
			for _, s := range []string{"otp.issued.acme", "otp.verified.acme", "otp.delivered.acme", "otp.requested.acme",
				"otp.dispatch.acme", "otp.challenge.acme", "otp.erasure_requested.acme", "otp.operator_action.acme"} {
				denyPublish(t, auditor, s)
			}
			denySubscribe(t, auditor, "otp.>")
			denyAPI(t, auditor, "STREAM.CREATE.SCRATCH", `{"name":"SCRATCH","subjects":["scratch"]}`)
			denyAPI(t, auditor, "STREAM.DELETE.OTP_EVENTS", ``)
			denyAPI(t, auditor, "CONSUMER.CREATE.OTP_EVENTS.auditor", `{"stream_name":"OTP_EVENTS","config":{"durable_name":"auditor","ack_policy":"none"}}`)
			denyAPI(t, auditor, "CONSUMER.DELETE.OTP_EVENTS.auditor", ``)
			denyAPI(t, auditor, "CONSUMER.DELETE.OTP_EVENTS.issuer-erasure", ``)
			denyAPI(t, auditor, "CONSUMER.MSG.NEXT.OTP_EVENTS.verifier", `{"batch":1}`)
			denyAPI(t, auditor, "CONSUMER.MSG.NEXT.OTP_EVENTS.verifier-status", `{"batch":1}`)
			denyAPI(t, auditor, "CONSUMER.MSG.NEXT.OTP_EVENTS.issuer-feedback", `{"batch":1}`)
			denyAPI(t, auditor, "CONSUMER.CREATE.OTP_EVENTS.spy", `{"stream_name":"OTP_EVENTS","config":{"name":"spy","ack_policy":"none","deliver_subject":"otp.verified.globex"}}`)
			denyAPI(t, auditor, "CONSUMER.CREATE.OTP_EVENTS", `{"stream_name":"OTP_EVENTS","config":{"name":"spy","ack_policy":"none","deliver_subject":"otp.verified.globex"}}`)
			denyAPI(t, auditor, "CONSUMER.DELETE.OTP_EVENTS.spy", ``)
			denyAPI(t, auditor, "CONSUMER.CREATE.OTP_REQUESTS.spy", `{"stream_name":"OTP_REQUESTS","config":{"name":"spy","ack_policy":"none"}}`)
			denyAPI(t, auditor, "STREAM.INFO.OTP_CHALLENGES", `{}`)
		})
		t.Run(operator.id, func(t *testing.T) {
			t.Parallel()
			// It republishes requests, jobs and codes (dlq redrive), never an event or a
			// dead letter.
			denyPublish(t, operator, "otp.dispatch.acme")
			denyPublish(t, operator, "otp.challenge.acme")
			denyPublish(t, operator, "otp.challenge_superseded.acme")
			denyPublish(t, operator, "otp.issued.acme")
			denyPublish(t, operator, "otp.delivered.acme")
			denyPublish(t, operator, "otp.dlq.acme")
			denyPublish(t, operator, "otp.verified.acme")
			denyPublish(t, operator, "otp.erased.acme")
			denyRequest(t, operator, "otp.verify.acme")
			denyRequest(t, operator, "otp.status.acme")
			denySubscribe(t, operator, "otp.>")
			denyAPI(t, operator, "STREAM.INFO.OTP_DISPATCH", `{}`)
			denyAPI(t, operator, "STREAM.CREATE.SCRATCH", `{"name":"SCRATCH","subjects":["scratch"]}`)
			denyAPI(t, operator, "STREAM.PURGE.OTP_REQUESTS", `{}`)
			denyAPI(t, operator, "STREAM.PURGE.OTP_REQUESTS_acme", `{}`)
			denyAPI(t, operator, "STREAM.DELETE.OTP_REQUESTS_globex", ``)
			denyAPI(t, operator, "STREAM.UPDATE.OTP_REQUESTS_acme", `{"name":"OTP_REQUESTS_acme","subjects":["otp.requested.acme"],"max_bytes":1}`)
			denyAPI(t, operator, "STREAM.DELETE.OTP_DLQ", ``)
			denyAPI(t, operator, "STREAM.MSG.DELETE.OTP_EVENTS", `{"seq":1}`)
			denyAPI(t, operator, "CONSUMER.CREATE.OTP_EVENTS.auditor", `{"stream_name":"OTP_EVENTS","config":{"durable_name":"auditor","ack_policy":"none"}}`)
			denyAPI(t, operator, "CONSUMER.DELETE.OTP_REQUESTS.issuer", ``)
			denyAPI(t, operator, "CONSUMER.CREATE.OTP_EVENTS.spy", `{"stream_name":"OTP_EVENTS","config":{"name":"spy","ack_policy":"none","deliver_subject":"otp.verified.globex"}}`)
			denyAPI(t, operator, "CONSUMER.CREATE.OTP_EVENTS", `{"stream_name":"OTP_EVENTS","config":{"name":"spy","ack_policy":"none","deliver_subject":"otp.verified.globex"}}`)
			denyAPI(t, operator, "CONSUMER.MSG.NEXT.OTP_EVENTS.issuer-erasure", `{"batch":1}`)
			denyAPI(t, operator, "CONSUMER.MSG.NEXT.OTP_EVENTS.auditor", `{"batch":1}`)
			denyAPI(t, operator, "CONSUMER.MSG.NEXT.OTP_EVENTS.issuer-feedback", `{"batch":1}`)
			denyAPI(t, operator, "CONSUMER.MSG.NEXT.OTP_EVENTS.verifier-status", `{"batch":1}`)
			denyAPI(t, operator, "CONSUMER.MSG.NEXT.OTP_REQUESTS.issuer", `{"batch":1}`)
			denyAPI(t, operator, "CONSUMER.MSG.NEXT.OTP_REQUESTS.issuer_acme", `{"batch":1}`)
			denyAPI(t, operator, "CONSUMER.DELETE.OTP_REQUESTS.issuer_globex", ``)
			denyAPI(t, operator, "CONSUMER.INFO.OTP_DISPATCH.dispatcher", `{}`)
		})
		t.Run(system.id, func(t *testing.T) {
			t.Parallel()
			denyRequest(t, system, "$JS.API.ACCOUNT.PURGE.OTPFLOW")
			denyRequest(t, system, "$JS.API.STREAM.DELETE.OTP_EVENTS")
			denyRequest(t, system, "$SYS.REQ.SERVER."+d.Server.ID()+".KICK")
			denyRequest(t, system, "$SYS.REQ.SERVER."+d.Server.ID()+".RELOAD")
			denyRequest(t, system, "$SYS.REQ.ACCOUNT.OTPFLOW.CONNZ")
			denyPublish(t, system, "otp.requested.acme")
			denySubscribe(t, system, ">")
		})
		t.Run(admin.id, func(t *testing.T) {
			t.Parallel()
			denyPublish(t, admin, "otp.requested.acme")
			denyPublish(t, admin, "otp.erasure_requested.acme")
			denyPublish(t, admin, "scratch.x")
			denyRequest(t, admin, "otp.verify.acme")
			denyRequest(t, admin, "otp.status.acme")
			denySubscribe(t, admin, "otp.>")
			denySubscribe(t, admin, ">")
		})
	})
}

// jsPublish publishes an empty body to subject and expects the stream's acknowledgement.
func jsPublish(ctx context.Context, t *testing.T, c *identityConn, subject string) *jetstream.PubAck {
	t.Helper()
	ack, err := c.js.Publish(ctx, subject, []byte(`{}`))
	if err != nil {
		t.Fatalf("%s may publish %s: %v (errors: %v)", c.id, subject, err, c.seen())
	}
	return ack
}

// denyPublish publishes to subject and expects the server's permissions violation for it
// and no stream to store it (a JetStream publish gets no acknowledgement).
func denyPublish(t *testing.T, c *identityConn, subject string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := c.js.Publish(ctx, subject, []byte(`{}`))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("%s publish %s: %v, want no acknowledgement", c.id, subject, err)
	}
	must(t, c.violation(fmt.Sprintf("Publish to %q", subject)))
	t.Logf("refused: %s publish %s (%v)", c.id, subject, err)
}

// denyRequest sends a request on subject and expects the violation and no answer.
func denyRequest(t *testing.T, c *identityConn, subject string) {
	t.Helper()
	m, err := c.nc.Request(subject, []byte(`{}`), 500*time.Millisecond)
	if !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("%s asked %s: %v %v, want no answer", c.id, subject, m, err)
	}
	must(t, c.violation(fmt.Sprintf("Publish to %q", subject)))
	t.Logf("refused: %s request %s (%v)", c.id, subject, err)
}

// denySubscribe subscribes to subject and expects the violation.
func denySubscribe(t *testing.T, c *identityConn, subject string) {
	t.Helper()
	sub, err := c.nc.SubscribeSync(subject)
	testenv.Must(t, err, "subscribe")
	defer func() { _ = sub.Unsubscribe() }()
	must(t, c.violation(fmt.Sprintf("Subscription to %q", subject)))
	if _, err := sub.NextMsg(10 * time.Millisecond); !errors.Is(err, nats.ErrPermissionViolation) {
		t.Fatalf("%s subscription to %s: %v, want the permissions violation", c.id, subject, err)
	}
	t.Logf("refused: %s subscribe %s", c.id, subject)
}

// denyAPI sends a JetStream API request (api: the subject after the prefix, such as
// "STREAM.INFO.OTP_EVENTS") under the deployment's prefix, where the imports are, and
// under $JS.API, the identity's own account's API, and expects the violation and no
// answer for both.
func denyAPI(t *testing.T, c *identityConn, api, body string) {
	t.Helper()
	for _, subject := range []string{testenv.DeployJSAPIPrefix + "." + api, "$JS.API." + api} {
		m, err := c.nc.Request(subject, []byte(body), 500*time.Millisecond)
		if !errors.Is(err, nats.ErrTimeout) {
			t.Fatalf("%s called %s: %v %v, want no answer", c.id, subject, m, err)
		}
		must(t, c.violation(fmt.Sprintf("Publish to %q", subject)))
		t.Logf("refused: %s %s (%v)", c.id, subject, err)
	}
}

// fetchAck pulls n messages from cons and acknowledges them.
func fetchAck(t *testing.T, cons jetstream.Consumer, n int) {
	t.Helper()
	batch, err := cons.Fetch(n, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch")
	got := 0
	for m := range batch.Messages() {
		testenv.Must(t, m.DoubleAck(context.Background()), "ack %s", m.Subject())
		got++
	}
	testenv.Must(t, batch.Error(), "fetch")
	if got != n {
		t.Fatalf("fetched %d messages of %s, want %d", got, cons.CachedInfo().Name, n)
	}
}

// readInOrder reads OTP_EVENTS (filtered by filter when set) in order by direct gets
// (platform.ScanStream), as the auditor's anchor check and the CLI's audit and erase do,
// and expects a message.
func readInOrder(ctx context.Context, t *testing.T, c *identityConn, filter string) {
	t.Helper()
	n := 0
	_, err := platform.ScanStream(ctx, c.js, events.StreamEvents, platform.Scan{Filter: filter}, func(*jetstream.RawStreamMsg) error {
		n++
		return nil
	})
	testenv.Must(t, err, "%s: read OTP_EVENTS in order", c.id)
	if n == 0 {
		t.Fatalf("%s: read nothing of OTP_EVENTS on %q", c.id, filter)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
