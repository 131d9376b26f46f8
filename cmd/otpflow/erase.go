package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// erasingServices answer every erasure with otp.erased.
var erasingServices = []string{"issuer", "dispatcher", "verifier", "auditor"}

// eraseCommand erases one person of a tenant from every store: it deletes their
// messages still on OTP_REQUESTS, OTP_CHALLENGES and OTP_DLQ (by sequence, overwriting
// the stored bytes), publishes otp.erasure_requested carrying only their subject hashes, and waits
// for each service's otp.erased. Exit 0 when every service answered; 1 when one did not
// within --wait (its durable consumer still holds the request: it erases when it runs).
func eraseCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) (int, error) {
	fs := flag.NewFlagSet("erase", flag.ContinueOnError)
	server, dir := serverFlags(fs)
	var (
		tenant    = fs.String("tenant", "", "the person's tenant (required)")
		recipient = fs.String("recipient", "", "the person's address (required)")
		wait      = fs.Duration("wait", 2*time.Minute, "how long to wait for every service to answer")
	)
	if err := fs.Parse(args); err != nil {
		return 2, err
	}
	getenv = withDevKeys(getenv, *dir)
	if *tenant == "" || *recipient == "" {
		return 2, errors.New("erase: --tenant and --recipient are required")
	}
	if !events.ValidTenant(*tenant) {
		return 2, fmt.Errorf("erase: %q is not a tenant id", *tenant)
	}
	subjects, err := keys.ParseSubjects(getenv("OTP_SUBJECT_KEY"))
	if err != nil {
		return 2, &platform.ConfigError{Var: "OTP_SUBJECT_KEY", Msg: err.Error()}
	}
	hashes := subjects.SubjectHashes(*tenant, *recipient)
	address := events.CanonicalAddress(*recipient)

	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return 1, fmt.Errorf("erase: nothing done: %w", err)
	}
	defer nc.Close()

	// The streams first: a request of theirs still waiting is not issued after the
	// services have erased. The tenant's own request stream (OTP_TENANT_STREAMS) before
	// OTP_REQUESTS, which sources it: a request not sourced yet is gone before it could be.
	isRequest := func(m *jetstream.RawStreamMsg) bool { return requestNames(m.Data, address) }
	own, ownLast, err := deleteMatchingFrom(ctx, js, events.TenantRequestsStream(*tenant), events.TypeRequested.Subject(*tenant), 0, isRequest)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		own, err = -1, nil
	}
	if err != nil {
		return 1, fmt.Errorf("erase: %s: %w", events.TenantRequestsStream(*tenant), err)
	}
	requests, reqLast, err := deleteMatchingFrom(ctx, js, events.StreamRequests, events.TypeRequested.Subject(*tenant), 0, isRequest)
	if err != nil {
		return 1, fmt.Errorf("erase: %s: %w", events.StreamRequests, err)
	}
	if own >= 0 {
		// A request sourced while the two were read may have reached OTP_REQUESTS after
		// its pass: wait until OTP_REQUESTS holds what the tenant's stream held (sourcing
		// keeps order), then read what it stored since.
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := platform.AwaitSourced(wctx, js, *tenant, ownLast)
		cancel()
		if err != nil {
			fmt.Fprintf(stdout, "warning: %s is not all on %s yet (%v): a request of this person in transit may still be issued; run erase again later\n",
				events.TenantRequestsStream(*tenant), events.StreamRequests, err)
		}
		late, _, err := deleteMatchingFrom(ctx, js, events.StreamRequests, events.TypeRequested.Subject(*tenant), reqLast+1, isRequest)
		if err != nil {
			return 1, fmt.Errorf("erase: %s: %w", events.StreamRequests, err)
		}
		requests += late
		fmt.Fprintf(stdout, "deleted %d requests from %s\n", own, events.TenantRequestsStream(*tenant))
		// The two hold copies of the same requests; one may still hold a request the
		// other does not (not sourced yet, or aged out first).
		requests = max(requests, own)
	}
	challenges, err := deleteMatching(ctx, js, events.StreamChallenges, events.TypeChallenge.Subject(*tenant), func(m *jetstream.RawStreamMsg) bool {
		var c struct {
			RecipientHashes []string `json:"recipient_hashes"`
		}
		_ = json.Unmarshal(m.Data, &c)
		return slices.ContainsFunc(c.RecipientHashes, func(h string) bool { return subjects.MatchesSubject(h, *tenant, *recipient) })
	})
	if err != nil {
		return 1, fmt.Errorf("erase: %s (%d requests deleted): %w", events.StreamChallenges, requests, err)
	}
	dead, err := deleteMatching(ctx, js, events.StreamDLQ, events.TypeDLQ.Subject(*tenant), func(m *jetstream.RawStreamMsg) bool {
		if slices.ContainsFunc(m.Header.Values(events.HeaderRecipientHash), func(h string) bool {
			return subjects.MatchesSubject(h, *tenant, *recipient)
		}) {
			return true
		}
		// An entry of an earlier release holds the original in the clear.
		return m.Header.Get(events.HeaderRecipientHash) == "" && requestNames(m.Data, address)
	})
	if err != nil {
		return 1, fmt.Errorf("erase: %s (%d requests and %d codes deleted): %w", events.StreamDLQ, requests, challenges, err)
	}
	fmt.Fprintf(stdout, "deleted %d requests from %s, %d codes from %s and %d dead letters from %s\n",
		requests, events.StreamRequests, challenges, events.StreamChallenges, dead, events.StreamDLQ)

	req := events.ErasureRequested{ErasureID: newUUID(), Tenant: *tenant, RecipientHashes: hashes,
		Identity: operatorIdentity(ctx, nc), DeletedRequests: requests, DeletedDeadLetters: dead, RequestedAt: time.Now().UTC()}
	msg, err := events.NewMsg(events.TypeErasureRequested, *tenant, "erasure:"+req.ErasureID, "", req,
		events.Envelope{Source: "otpflow/cli", Time: req.RequestedAt})
	if err != nil {
		return 1, err
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	ack, err := js.PublishMsg(pctx, msg)
	cancel()
	if err != nil {
		return 1, fmt.Errorf("erase: %d requests and %d dead letters deleted, but the services were not asked: publish %s: %w",
			requests, dead, events.TypeErasureRequested, err)
	}
	fmt.Fprintf(stdout, "erasure %s requested\n", req.ErasureID)

	answers, err := awaitErased(ctx, js, req, ack.Sequence, *wait)
	for _, svc := range erasingServices {
		if n, ok := answers[svc]; ok {
			fmt.Fprintf(stdout, "%-10s erased %d rows\n", svc, n)
		}
	}
	if err != nil {
		return 1, err
	}
	var missing []string
	for _, svc := range erasingServices {
		if _, ok := answers[svc]; !ok {
			missing = append(missing, svc)
		}
	}
	if len(missing) > 0 {
		return 1, fmt.Errorf("erase: no answer within %v from %s; each erases when it next runs (its consumer keeps the request)",
			*wait, strings.Join(missing, ", "))
	}
	return 0, nil
}

// requestNames reports whether a body in the clear (a request, or the original of a dead
// letter of an earlier release) is about address: its recipient, canonical form; for a
// body that is not JSON, the address as a whole word anywhere in it (never inside a longer
// address: erasing ana@example.com must not touch joana@example.com's).
func requestNames(data []byte, address string) bool {
	var r struct {
		Recipient string `json:"recipient"`
	}
	if err := json.Unmarshal(data, &r); err == nil {
		return r.Recipient != "" && events.CanonicalAddress(r.Recipient) == address
	}
	return wholeAddress(strings.ToLower(string(data)), address)
}

// wholeAddress reports whether address occurs in s with no address character either side.
func wholeAddress(s, address string) bool {
	part := func(c byte) bool {
		return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.IndexByte(".!#$%&'*+/=?^_`{|}~-@", c) >= 0
	}
	for i := 0; ; {
		j := strings.Index(s[i:], address)
		if j < 0 {
			return false
		}
		j += i
		end := j + len(address)
		if (j == 0 || !part(s[j-1])) && (end == len(s) || !part(s[end])) {
			return true
		}
		i = j + 1
	}
}

// deleteMatching deletes, overwriting the stored bytes, every message of stream on filter
// that match accepts, and returns how many it deleted. It reads the stream as it is now.
func deleteMatching(ctx context.Context, js jetstream.JetStream, stream, filter string, match func(*jetstream.RawStreamMsg) bool) (int, error) {
	n, _, err := deleteMatchingFrom(ctx, js, stream, filter, 0, match)
	return n, err
}

// deleteMatchingFrom is deleteMatching from sequence from on; it also returns the
// stream's last sequence when it began.
func deleteMatchingFrom(ctx context.Context, js jetstream.JetStream, stream, filter string, from uint64, match func(*jetstream.RawStreamMsg) bool) (int, uint64, error) {
	st, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, 0, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, 0, err
	}
	if info.State.Msgs == 0 {
		return 0, info.State.LastSeq, nil
	}
	n, last := 0, info.State.LastSeq
	for seq := max(info.State.FirstSeq, from); seq <= last; seq++ {
		// From the leader: a replica behind it (OTP_DLQ allows direct gets) would say
		// "not found" of what it has not stored yet.
		m, err := platform.GetMsg(ctx, js, stream, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return n, last, fmt.Errorf("read sequence %d: %w", seq, err)
		}
		if filter != "" && !platform.SubjectMatches(filter, m.Subject) || !match(m) {
			continue
		}
		if err := st.SecureDeleteMsg(ctx, seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			return n, last, fmt.Errorf("delete sequence %d: %w", seq, err)
		}
		n++
	}
	return n, last, nil
}

// awaitErased reads otp.erased of req's tenant from OTP_EVENTS, from the request's
// sequence on, until every service has answered req or wait has passed, and returns the
// rows each erased. Any service may publish otp.erased, so an answer in a service's name
// is taken only once that service's own durable consumer (erasureConsumerOf) has
// acknowledged the request: the service alone can acknowledge it, after it erased.
func awaitErased(ctx context.Context, js jetstream.JetStream, req events.ErasureRequested, from uint64, wait time.Duration) (map[string]int64, error) {
	answers, claimed := map[string]int64{}, map[string]int64{}
	deadline := time.Now().Add(wait)
	pos, pause := from, 50*time.Millisecond
	for {
		last, err := platform.ScanStream(ctx, js, events.StreamEvents, platform.Scan{Filter: events.TypeErased.Subject(req.Tenant), From: pos},
			func(m *jetstream.RawStreamMsg) error {
				var e events.Erased
				if events.DecodeEvent(m.Data, &e) == nil && e.ErasureID == req.ErasureID {
					claimed[e.Service] = e.Rows
				}
				return nil
			})
		if err != nil {
			return answers, err
		}
		pos = max(pos, last+1)
		for svc, rows := range claimed {
			if _, ok := answers[svc]; ok || !slices.Contains(erasingServices, svc) {
				continue
			}
			done, err := acknowledged(ctx, js, erasureConsumerOf(svc), from)
			if err != nil {
				return answers, err
			}
			if done {
				answers[svc] = rows
			}
		}
		left := time.Until(deadline)
		if len(answers) == len(erasingServices) || left <= 0 || ctx.Err() != nil {
			return answers, nil
		}
		select {
		case <-ctx.Done():
		case <-time.After(min(pause, left)):
		}
		pause = min(2*pause, time.Second)
	}
}

// erasureConsumerOf is the durable consumer on OTP_EVENTS through which svc learns of an
// erasure: the auditor reads every event through its own.
func erasureConsumerOf(svc string) string {
	if svc == events.ConsumerAuditor {
		return events.ConsumerAuditor
	}
	return events.ErasureConsumer(svc).Durable
}

// acknowledged reports whether durable consumer name on OTP_EVENTS has acknowledged
// every message up to stream sequence seq.
func acknowledged(ctx context.Context, js jetstream.JetStream, name string, seq uint64) (bool, error) {
	cons, err := js.Consumer(ctx, events.StreamEvents, name)
	if err != nil {
		return false, fmt.Errorf("erase: how far %s got: %w", name, err)
	}
	return cons.CachedInfo().AckFloor.Stream >= seq, nil
}

// newUUID returns a random (version 4) UUID in the lowercase canonical form.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
