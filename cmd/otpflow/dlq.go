package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/services/auditor"
)

const dlqUsage = `usage: otpflow dlq <command> [flags]

commands:
  list     [--consumer C] [--reason TEXT] [--since RFC3339|DURATION]
           one line per dead letter: sequence, time, consumer, original subject,
           recipient hash, reason (no personal data)
  show     SEQ                 open one dead letter (OTP_DLQ_KEY): it may hold personal data
  redrive  SEQ | --all [--consumer C]
           hand the original back to its consumer, then delete the entry: a request is
           published again under a new message id; an event the auditor gave up is
           named in an otp.operator_action the auditor chains it on; dispatch jobs,
           codes and other consumers' events are refused (drop them)
  drop     SEQ | --all [--consumer C]
           delete the entry, overwriting its stored bytes
`

// redrivable are the streams whose originals a redrive may hand back to their consumer.
//
// OTP_REQUESTS: the original is published again, and the issuer recognises a message it
// already handled (a request by tenant and request id; a resend, whose request id every
// resend of the request shares, by the message's identity: the Otp-Redrive-Of a redrive
// sets, else its Nats-Msg-Id, else "OTP_REQUESTS:<sequence>", which is what a redrive
// names an id-less original).
//
// OTP_EVENTS, the auditor's entries: the original is not published again (every reader
// of the stream would take a copy for a new event, and the auditor would chain it
// twice). The redrive is an otp.operator_action "dlq.redrive" naming the original by
// stream sequence and ce-id (events.RedriveRef), on which the auditor chains the
// original's row under its own sequence, once (services/auditor redrive.go). The other
// readers of OTP_EVENTS keep nothing a redrive could mend: the verifier's projection of
// a code (the code's lifetime is over long before), and an erasure consumer's request,
// which `otpflow erase` asks again.
//
// A dispatch job carries the sealed code and a challenge its code's MAC: publishing them
// is the issuer's alone (whoever may could supersede a live code or republish one with a
// later expiry), so the operator drops them and the app asks again.
var redrivable = []string{events.StreamRequests, events.StreamEvents}

// dlqCommand runs "otpflow dlq ..." and returns the exit code.
func dlqCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) (int, error) {
	if len(args) == 0 {
		fmt.Fprint(stderr, dlqUsage)
		return 2, nil
	}
	fs := flag.NewFlagSet("dlq "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	server, dir := serverFlags(fs)
	consumer := fs.String("consumer", "", "only the dead letters of this durable consumer (issuer, which takes issuer_<tenant> too, dispatcher, verifier, auditor, <service>-erasure)")
	var reason, since *string
	var all *bool
	switch args[0] {
	case "list":
		reason = fs.String("reason", "", "only the dead letters whose reason contains this text")
		since = fs.String("since", "", "only the dead letters stored since this time (RFC 3339) or for this long (a duration: 24h)")
	case "show":
	case "redrive", "drop":
		all = fs.Bool("all", false, "every dead letter (of --consumer, when given)")
	default:
		fmt.Fprint(stderr, dlqUsage)
		return 2, fmt.Errorf("unknown dlq command %q", args[0])
	}
	// The sequence may come before or after the flags.
	rest := args[1:]
	var seqArg string
	if len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		seqArg, rest = rest[0], rest[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return 2, err
	}
	if seqArg == "" && fs.NArg() > 0 {
		seqArg = fs.Arg(0)
	}
	getenv = withDevKeys(getenv, *dir)
	var seq uint64
	if seqArg != "" {
		n, err := strconv.ParseUint(seqArg, 10, 64)
		if err != nil || n == 0 {
			return 2, fmt.Errorf("dlq %s: %q is not a sequence of %s", args[0], seqArg, events.StreamDLQ)
		}
		seq = n
	}
	switch {
	case args[0] == "show" && seq == 0:
		return 2, errors.New("dlq show: which sequence?")
	case all != nil && (seq == 0) == !*all:
		return 2, fmt.Errorf("dlq %s: give one sequence or --all", args[0])
	case all != nil && seq != 0 && *consumer != "":
		return 2, fmt.Errorf("dlq %s: --consumer goes with --all", args[0])
	}
	var from time.Time
	if since != nil && *since != "" {
		t, err := parseSince(*since, time.Now())
		if err != nil {
			return 2, fmt.Errorf("dlq list: --since: %w", err)
		}
		from = t
	}
	var sealer *keys.Sealer
	if args[0] == "show" || args[0] == "redrive" {
		s, err := platform.LoadDLQKey(getenv)
		if err != nil {
			return 2, err
		}
		sealer = s
	}

	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return 1, fmt.Errorf("dlq %s: nothing done: %w", args[0], err)
	}
	defer nc.Close()
	st, err := js.Stream(ctx, events.StreamDLQ)
	if err != nil {
		return 1, fmt.Errorf("dlq %s: nothing done: %w", args[0], err)
	}
	d := &dlq{st: st, js: js, sealer: sealer, stdout: stdout}

	switch args[0] {
	case "list":
		return 0, d.each(ctx, 0, from, func(m *jetstream.RawStreamMsg) error {
			h := m.Header
			if !ofConsumer(*consumer, h.Get(events.HeaderDLQConsumer)) ||
				*reason != "" && !strings.Contains(strings.ToLower(h.Get(events.HeaderDLQReason)), strings.ToLower(*reason)) ||
				!from.IsZero() && m.Time.Before(from) {
				return nil
			}
			fmt.Fprintf(stdout, "%d\t%s\t%s\t%s\t%s\t%s\n", m.Sequence, m.Time.UTC().Format(time.RFC3339), orDash(h.Get(events.HeaderDLQConsumer)),
				orDash(h.Get(events.HeaderDLQSubject)), orDash(h.Get(events.HeaderRecipientHash)), orDash(h.Get(events.HeaderDLQReason)))
			return nil
		})
	case "show":
		return d.show(ctx, seq)
	}
	act := d.redrive
	if args[0] == "drop" {
		act = d.drop
	}
	failed := 0
	err = d.each(ctx, seq, time.Time{}, func(m *jetstream.RawStreamMsg) error {
		if !ofConsumer(*consumer, m.Header.Get(events.HeaderDLQConsumer)) {
			return nil
		}
		if err := act(ctx, m); err != nil {
			if seq != 0 || errors.Is(err, errNotAudited) {
				return err
			}
			failed++
			fmt.Fprintf(stdout, "%d\tnot done: %v\n", m.Sequence, err)
		}
		return nil
	})
	if err != nil {
		return 1, fmt.Errorf("dlq %s: %w", args[0], err)
	}
	if failed > 0 {
		return 1, fmt.Errorf("dlq %s: %d dead letters not done (left in %s)", args[0], failed, events.StreamDLQ)
	}
	return 0, nil
}

// errNotAudited marks an action that was done but whose otp.operator_action was not
// published: a run of --all stops there.
var errNotAudited = errors.New("not audited")

// dlq is the operator's view of OTP_DLQ.
type dlq struct {
	st     jetstream.Stream
	js     jetstream.JetStream
	sealer *keys.Sealer
	stdout io.Writer
}

// each calls fn with the entry at seq, or with every entry stored since from (all of
// them when from is zero), in order, when seq is 0: one entry by sequence
// ($JS.API.STREAM.MSG.GET), the rest by batched direct gets (platform.ScanStream).
func (d *dlq) each(ctx context.Context, seq uint64, from time.Time, fn func(*jetstream.RawStreamMsg) error) error {
	if seq != 0 {
		m, err := platform.GetMsg(ctx, d.js, events.StreamDLQ, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return fmt.Errorf("%s has no entry %d", events.StreamDLQ, seq)
		}
		if err != nil {
			return fmt.Errorf("read %s %d: %w", events.StreamDLQ, seq, err)
		}
		return fn(m)
	}
	if !d.st.CachedInfo().Config.AllowDirect {
		// Provisioned by an earlier release: one request per sequence.
		info, err := d.st.Info(ctx)
		if err != nil || info.State.Msgs == 0 {
			return err
		}
		for s := info.State.FirstSeq; s <= info.State.LastSeq; s++ {
			m, err := platform.GetMsg(ctx, d.js, events.StreamDLQ, s)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				continue
			}
			if err != nil {
				return fmt.Errorf("read %s %d: %w", events.StreamDLQ, s, err)
			}
			if !from.IsZero() && m.Time.Before(from) {
				continue
			}
			if err := fn(m); err != nil {
				return err
			}
		}
		return nil
	}
	_, err := platform.ScanStream(ctx, d.js, events.StreamDLQ, platform.Scan{Since: from}, fn)
	return err
}

// show prints the entry at seq opened: the original's subject, headers and body.
func (d *dlq) show(ctx context.Context, seq uint64) (int, error) {
	err := d.each(ctx, seq, time.Time{}, func(m *jetstream.RawStreamMsg) error {
		orig, err := platform.OpenDeadLetter(d.sealer, m.Header, m.Data)
		if err != nil {
			return fmt.Errorf("open %s %d: %w", events.StreamDLQ, seq, err)
		}
		w := d.stdout
		fmt.Fprintf(w, "WARNING: dead letter %d opened: the original below may hold personal data (an address); do not paste it into tickets or chats\n", seq)
		fmt.Fprintf(w, "sequence: %d\nstored: %s\n", m.Sequence, m.Time.UTC().Format(time.RFC3339Nano))
		for _, k := range slices.Sorted(maps.Keys(m.Header)) {
			for _, v := range m.Header[k] {
				fmt.Fprintf(w, "dlq %s: %s\n", k, v)
			}
		}
		fmt.Fprintf(w, "subject: %s\n", orig.Subject)
		for _, k := range slices.Sorted(maps.Keys(orig.Header)) {
			for _, v := range orig.Header[k] {
				fmt.Fprintf(w, "header %s: %s\n", k, v)
			}
		}
		fmt.Fprintf(w, "body: %s\n", orig.Data)
		return nil
	})
	if err != nil {
		return 1, fmt.Errorf("dlq show: %w", err)
	}
	return 0, nil
}

// redrive publishes the original of entry m to its subject under a new message id and,
// once the stream acknowledged it, deletes the entry and records the action.
func (d *dlq) redrive(ctx context.Context, m *jetstream.RawStreamMsg) error {
	origin := m.Header.Get(events.HeaderDLQStream)
	if !slices.Contains(redrivable, origin) {
		return fmt.Errorf("an original of %s is not redriven (only %s): drop it once handled", orDash(origin), strings.Join(redrivable, ", "))
	}
	if origin == events.StreamEvents {
		switch c := m.Header.Get(events.HeaderDLQConsumer); {
		case c == events.ConsumerAuditor:
		case c == events.VerifierStatusConsumer.Durable:
			return fmt.Errorf("the status projection's entry is not redriven: otp.status answers from the request's other events, and its row goes with the retention; drop it once read")
		case strings.HasSuffix(c, "-erasure"):
			return fmt.Errorf("an erasure consumer's entry is not redriven: run otpflow erase for the person again (an erasure may be asked again; dlq show names them), then drop it")
		default:
			return fmt.Errorf("an original of %s read by %s is not redriven (only the auditor's): drop it once handled", origin, orDash(c))
		}
	}
	orig, err := platform.OpenDeadLetter(d.sealer, m.Header, m.Data)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	// The seal binds the origin stream; the subject must still be one of it and of the
	// entry's tenant, or the entry is not what it says.
	_, tenant, _ := events.SplitSubject(m.Subject)
	if orig.Subject != m.Header.Get(events.HeaderDLQSubject) {
		return fmt.Errorf("the sealed subject differs from %s", events.HeaderDLQSubject)
	}
	if _, t, err := events.SplitSubject(orig.Subject); err != nil || t != tenant {
		return fmt.Errorf("the original's subject is not one of tenant %s", tenant)
	}
	// And of the stream the entry names, before anything is published: an entry that
	// claims OTP_REQUESTS but holds a challenge must not put one on OTP_CHALLENGES.
	if !streamHolds(origin, orig.Subject) {
		return fmt.Errorf("the original's subject %s is not one of %s (the entry stays)", orig.Subject, origin)
	}
	if origin == events.StreamEvents {
		return d.redriveEvent(ctx, m, orig, tenant)
	}
	// Where the request will land: OTP_REQUESTS when it captures the subject, else the
	// tenant's request stream when OTP_REQUESTS sources it (OTP_TENANT_STREAMS). A
	// stream that takes it and is not sourced would acknowledge it to nobody.
	landing, err := d.landing(ctx, origin, tenant, orig.Subject)
	if err != nil {
		return err
	}
	msg := nats.NewMsg(orig.Subject)
	msg.Data = orig.Data
	msg.Header = nats.Header{}
	for k, v := range orig.Header {
		msg.Header[k] = append([]string(nil), v...)
	}
	// A redriven message that was dead-lettered again keeps naming the first original:
	// the issuer recognises a resend by it.
	// An id-less original is named as the issuer names it (its tenant stream's sequence
	// when OTP_REQUESTS sourced it, else its sequence there), the one identity for both.
	seq, err := strconv.ParseUint(m.Header.Get(events.HeaderDLQSequence), 10, 64)
	if err != nil {
		return fmt.Errorf("%s %q is not a sequence (the entry stays)", events.HeaderDLQSequence, m.Header.Get(events.HeaderDLQSequence))
	}
	was := events.RequestMessageIdentity(msg.Header, seq)
	// JetStream refuses a publish that carries the header it sets on what it sources.
	msg.Header.Del(events.HeaderStreamSource)
	msg.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("redrive:%d:%s", m.Sequence, was))
	msg.Header.Set(events.HeaderRedriveOf, was)
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	ack, err := d.js.PublishMsg(pctx, msg)
	cancel()
	if err != nil {
		return fmt.Errorf("publish to %s: %w (the entry stays)", orig.Subject, err)
	}
	if ack.Duplicate {
		return fmt.Errorf("%s dropped the publish as a duplicate of %s %d (the entry stays)", ack.Stream, ack.Stream, ack.Sequence)
	}
	if ack.Stream != landing {
		return fmt.Errorf("published to %s, stored on %s, not %s", orig.Subject, ack.Stream, landing)
	}
	if err := d.st.SecureDeleteMsg(ctx, m.Sequence); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		// Published: a second redrive is recognised by the consumer; the entry stays.
		return fmt.Errorf("redriven to %s %d, but the entry was not deleted: %w", ack.Stream, ack.Sequence, err)
	}
	detail := fmt.Sprintf("%s %d (%s, consumer %s) redriven to %s %d", events.StreamDLQ, m.Sequence,
		orig.Subject, orDash(m.Header.Get(events.HeaderDLQConsumer)), ack.Stream, ack.Sequence)
	fmt.Fprintln(d.stdout, detail)
	return d.record(ctx, events.ActionDLQRedrive, tenant, detail)
}

// redriveEvent hands the auditor's entry m, whose opened original is orig, back to the
// auditor: it checks that OTP_EVENTS still holds the original at its sequence and that
// the auditor can now keep it, publishes the reference (events.RedriveRef) as the
// operator action, and deletes the entry.
func (d *dlq) redriveEvent(ctx context.Context, m *jetstream.RawStreamMsg, orig events.DeadLetter, tenant string) error {
	seq, err := strconv.ParseUint(m.Header.Get(events.HeaderDLQSequence), 10, 64)
	if err != nil || seq == 0 {
		return fmt.Errorf("%s %q is not a sequence (the entry stays)", events.HeaderDLQSequence, m.Header.Get(events.HeaderDLQSequence))
	}
	id := nats.Header(orig.Header).Get(events.HeaderID)
	if id == "" {
		return fmt.Errorf("the original has no %s, which the auditor names it by: not redriven; drop it (the entry stays)", events.HeaderID)
	}
	if typ, _, _ := events.SplitSubject(orig.Subject); typ == events.TypeErasureRequested {
		return fmt.Errorf("an erasure request is not chained late: run otpflow erase for the person again (dlq show names them), then drop it")
	}
	// From the leader, whose answer a stored message cannot forge (platform.GetMsg).
	stored, err := platform.GetMsg(ctx, d.js, events.StreamEvents, seq)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return fmt.Errorf("%s no longer holds sequence %d: nothing to redrive; drop it", events.StreamEvents, seq)
	case err != nil:
		return fmt.Errorf("read %s %d: %w (the entry stays)", events.StreamEvents, seq, err)
	case stored.Subject != orig.Subject || stored.Header.Get(events.HeaderID) != id || !bytes.Equal(stored.Data, orig.Data):
		return fmt.Errorf("%s %d is not the entry's original (the entry stays)", events.StreamEvents, seq)
	}
	if _, err := auditor.ToRow(nil, nil, stored.Sequence, stored.Time, stored.Subject, stored.Header, stored.Data); err != nil {
		return fmt.Errorf("the auditor still cannot keep %s %d: %v; drop it (the entry stays)", events.StreamEvents, seq, err)
	}
	detail := fmt.Sprintf("%s %d (%s, consumer %s) redriven: %s %d", events.StreamDLQ, m.Sequence, orig.Subject,
		events.ConsumerAuditor, events.StreamEvents, seq)
	ack, err := publishOperatorActionAs(ctx, d.js, fmt.Sprintf("redrive:%d:%s", m.Sequence, id), events.OperatorAction{
		Action: events.ActionDLQRedrive, Tenant: tenant, Detail: detail,
		Redrive: &events.RedriveRef{Stream: events.StreamEvents, StreamSeq: seq, EventID: id, Consumer: events.ConsumerAuditor, DLQSeq: m.Sequence}})
	if err != nil {
		return fmt.Errorf("%w (the entry stays)", err)
	}
	if err := d.st.SecureDeleteMsg(ctx, m.Sequence); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		// A second redrive of it adds no row: the auditor chains a sequence once.
		return fmt.Errorf("redriven (%s %d), but the entry was not deleted: %w", ack.Stream, ack.Sequence, err)
	}
	fmt.Fprintf(d.stdout, "%s, by %s %d\n", detail, ack.Stream, ack.Sequence)
	return nil
}

// landing is the stream a redrive of subject (tenant's, from origin) must be stored on:
// origin when it captures subject, else, for OTP_REQUESTS, the tenant's request stream
// it sources. An error when neither holds: the entry stays.
func (d *dlq) landing(ctx context.Context, origin, tenant, subject string) (string, error) {
	st, err := d.js.Stream(ctx, origin)
	if err != nil {
		return "", fmt.Errorf("%s: %w (the entry stays)", origin, err)
	}
	cfg := st.CachedInfo().Config
	for _, f := range cfg.Subjects {
		if platform.SubjectMatches(f, subject) {
			return origin, nil
		}
	}
	if origin == events.StreamRequests {
		own := events.TenantRequestsStream(tenant)
		for _, src := range cfg.Sources {
			if src != nil && src.Name == own && src.External == nil {
				return own, nil
			}
		}
	}
	return "", fmt.Errorf("%s neither captures %s nor sources a request stream of tenant %s: the request would be read by nobody (the entry stays)", origin, subject, tenant)
}

// streamHolds reports whether stream's subjects (the contract's) take subject.
func streamHolds(stream, subject string) bool {
	for _, c := range events.StreamConfigs(events.StreamOptions{}) {
		if c.Name != stream {
			continue
		}
		for _, f := range c.Subjects {
			if platform.SubjectMatches(f, subject) {
				return true
			}
		}
	}
	return false
}

// drop deletes entry m, overwriting its stored bytes, and records the action.
func (d *dlq) drop(ctx context.Context, m *jetstream.RawStreamMsg) error {
	if err := d.st.SecureDeleteMsg(ctx, m.Sequence); err != nil {
		return fmt.Errorf("delete %s %d: %w", events.StreamDLQ, m.Sequence, err)
	}
	_, tenant, _ := events.SplitSubject(m.Subject)
	detail := fmt.Sprintf("%s %d (%s, consumer %s) dropped", events.StreamDLQ, m.Sequence,
		orDash(m.Header.Get(events.HeaderDLQSubject)), orDash(m.Header.Get(events.HeaderDLQConsumer)))
	fmt.Fprintln(d.stdout, detail)
	return d.record(ctx, events.ActionDLQDrop, tenant, detail)
}

// record publishes the operator action of one entry, under the entry's tenant.
func (d *dlq) record(ctx context.Context, action, tenant, detail string) error {
	if !events.ValidTenant(tenant) {
		tenant = systemTenant
	}
	if err := publishOperatorAction(ctx, d.js, action, tenant, detail); err != nil {
		return fmt.Errorf("%w: %w", errNotAudited, notAudited(action, detail, err))
	}
	return nil
}

// parseSince reads --since: a time (RFC 3339) or how long ago (a duration).
func parseSince(s string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return time.Time{}, fmt.Errorf("%q is neither an RFC 3339 time nor a duration", s)
	}
	return now.Add(-d), nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// ofConsumer reports whether a dead letter of durable consumer had passes --consumer
// want: empty takes every one, and "issuer" takes the issuer's durable of every tenant
// ("issuer_<tenant>", events.IssuerConsumers) as well as its own.
func ofConsumer(want, had string) bool {
	return want == "" || had == want || want == events.ConsumerIssuer && events.IsIssuerConsumer(had)
}
