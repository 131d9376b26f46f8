// Package auditor writes every OTP_EVENTS message into the append-only audit log in
// schema audit, in stream order, once each.
package auditor

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Schema is the PostgreSQL schema the auditor owns.
const Schema = "audit"

//go:embed migrations/*.sql
var migrationFS embed.FS

// Migrations are the goose migrations of Schema.
func Migrations() fs.FS {
	sub, _ := fs.Sub(migrationFS, "migrations")
	return sub
}

// Config is the auditor's configuration.
type Config struct {
	// RecipientKey (OTP_AUDIT_KEY) derives the salts of the rows' personal-data digests.
	// Rows written before this release also hold recipient hashes made under it.
	RecipientKey []byte
	// Subjects (OTP_SUBJECT_KEY) is the one identity of a person and a client network:
	// events carry the recipient's and the client's hashes under it, and the auditor
	// hashes the plaintext of events from earlier releases under its active key, so the
	// log holds no address or IP. Trails and erasures look up every key of the ring.
	Subjects *keys.Subjects
	// Chain keys the row hashes (OTP_AUDIT_CHAIN_KEY); required.
	Chain     *Chain
	BatchSize int
	// Linger is how long a batch that is not full waits for more events before it is
	// chained (platform.ConsumeConfig.Linger): default DefaultLinger; negative, none. A
	// batch costs a transaction and a statement per kind of row, whatever its size.
	Linger time.Duration
	// Signer signs the checkpoints published to OTP_AUDIT (OTP_AUDIT_SIGNING_KEY); nil
	// publishes none and skips the scheduled check.
	Signer *Signer
	// A checkpoint is published every CheckpointEvery (default 10s) when the head moved,
	// and as soon as CheckpointRows rows (default 1,000) were written since the last one.
	CheckpointEvery time.Duration
	CheckpointRows  int
	// VerifyEvery is the period of the scheduled VerifyAnchored (default 10m).
	VerifyEvery time.Duration
	// Alerts are the anomaly rules' thresholds (OTP_ALERT_RULES); nil: the defaults.
	Alerts  map[string]Threshold
	Streams events.StreamOptions
	// DLQKey seals dead letters (OTP_DLQ_KEY); required.
	DLQKey *keys.Sealer
	// Tracer gets an "audit" span per event chained, in the event's trace; nil records
	// nothing.
	Tracer trace.Tracer
}

// Service is one auditor process.
type Service struct {
	cfg  Config
	pool *pgxpool.Pool
	js   jetstream.JetStream
	log  *slog.Logger
	reg  prometheus.Registerer

	written  *prometheus.CounterVec
	redrives *prometheus.CounterVec // redrive references, by outcome (redrive.go)
	alerts   *alerter
	// reputation counts the mails sent and their feedback, by tenant (reputation.go).
	reputation *reputation
	anchor     *anchorState
	// cons is the auditor's durable consumer once Run has bound it: an erasure waits for
	// its acknowledgement floor (eraseRow).
	cons jetstream.Consumer
}

// New returns an auditor; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if len(cfg.RecipientKey) < 32 {
		return nil, errors.New("auditor: recipient key of at least 32 bytes is required")
	}
	if cfg.Chain == nil {
		return nil, errors.New("auditor: a chain key is required")
	}
	if cfg.Subjects == nil || cfg.DLQKey == nil {
		return nil, errors.New("auditor: a subject key and a DLQ key are required")
	}
	if cfg.BatchSize < 1 {
		cfg.BatchSize = DefaultBatchSize
	}
	if cfg.Linger == 0 {
		cfg.Linger = DefaultLinger
	}
	s := &Service{cfg: cfg, pool: pool, js: js, log: log, reg: reg,
		written: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_auditor_events_total", Help: "Events written to the audit log, by type.",
		}, []string{"type"}),
		redrives: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_auditor_redrives_total",
			Help: "Redrives of the auditor's dead letters, by outcome: chained (the original's row written), already_chained (it had its row), refused (not the event named, gone, an erasure request, purged, still not storable, or refused by the database again and back in OTP_DLQ).",
		}, []string{"outcome"}),
	}
	if reg != nil {
		reg.MustRegister(s.written, s.redrives)
	}
	if cfg.Alerts == nil {
		cfg.Alerts = DefaultThresholds()
		s.cfg.Alerts = cfg.Alerts
	}
	s.alerts = newAlerter(cfg.Alerts, reg)
	s.reputation = newReputation(reg)
	s.anchor = newAnchorState(&s.cfg, reg)
	return s, nil
}

// Run consumes OTP_EVENTS until ctx is cancelled.
func (s *Service) Run(ctx context.Context) error {
	cons, err := platform.Bind(ctx, s.js, events.StreamEvents, events.AuditorConsumer)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	s.cons = cons
	if n, err := s.cfg.Chain.Backfill(ctx, s.pool, s.cfg.RecipientKey); err != nil {
		return platform.SetupError(ctx, fmt.Errorf("chain rows written before the chain: %w", err))
	} else if n > 0 {
		s.log.Info("chained rows written before the hash chain", "rows", n)
	}
	s.log.Info("auditor consuming", "stream", events.StreamEvents, "consumer", events.ConsumerAuditor)
	// Ordered: the chain follows stream order, so a failing event is tried again in place
	// with the events after it held behind it (handleBatch). Healthy: an event that fails
	// alone is blamed on itself only while the database answers.
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: events.ConsumerAuditor, BatchSize: s.cfg.BatchSize,
		Linger: s.cfg.Linger, JS: s.js, Log: s.log, Reg: s.reg, Ordered: true, Healthy: s.pool.Ping,
		DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey, Recipient: platform.EventRecipient(s.cfg.Subjects)}})
	anchored := make(chan struct{})
	go func() { defer close(anchored); s.runAnchor(ctx) }()
	err = c.Run(ctx, s.handleBatch)
	<-anchored
	return err
}

// DefaultLinger is Config.Linger's default: at 1,000 events a second, batches of about
// 20 instead of a handful (docs/performance.md).
const DefaultLinger = 20 * time.Millisecond

// DefaultBatchSize is Config.BatchSize's default: the events chained in one transaction.
const DefaultBatchSize = 200

// Row is one audit log row.
type Row struct {
	StreamSeq   uint64
	Subject     string
	Type        string
	Tenant      string
	EventID     string
	Source      string
	OccurredAt  time.Time
	RequestID   string
	ChallengeID string
	Payload     json.RawMessage // the event without its personal data
	// Event is the payload decoded by the contract (events.Issued, events.Delivered, …) for
	// the rules that interpret it; nil for a type this auditor does not know. Not stored:
	// Payload is what the log keeps, unknown fields and types included.
	Event any

	// Personal data, erasable: it enters the chain only through PIIDigest.
	// RecipientHash is the recipient's subject hash ("id:base64url" under OTP_SUBJECT_KEY)
	// as bytes; rows written before this release hold HMAC-SHA256(OTP_AUDIT_KEY, address).
	RecipientHash   []byte
	RecipientMasked string
	PII             map[string]string // client_hash
	PIISalt         []byte
	PIIDigest       []byte

	ChainPos   int64
	PrevHash   []byte
	RowHash    []byte
	ChainKeyID string // the chain key RowHash was made with

	// payloadCanonical says Payload is already canonical (ToRow made it), so hashing it
	// need not encode it again; a payload read back from PostgreSQL's jsonb is not.
	payloadCanonical bool
}

// Fields no audit row keeps, whatever the event: what verifies a code, and the session.
// otp.issued of earlier releases carried them; a producer that still sends them loses them
// here.
var droppedFields = []string{"code_hmac", "pepper_key_id", "session_id"}

// rowKeys are what every row is found by. They are read the same way from every event, of a
// known type or not.
type rowKeys struct {
	RequestID       string `json:"request_id"`
	ChallengeID     string `json:"challenge_id"`
	RecipientHash   string `json:"recipient_hash"`
	RecipientMasked string `json:"recipient_masked"`
	ClientHash      string `json:"client_hash"`
	SubjectHash     string `json:"subject_hash"`
	// Recipient and ClientIP are the plaintext of events from earlier releases.
	Recipient string `json:"recipient"`
	ClientIP  string `json:"client_ip"`
}

// ToRow turns an OTP_EVENTS message into its audit row, or fails for a message the log
// cannot keep: one that is not a JSON object within the size limit, or that holds what
// PostgreSQL refuses to store (a NUL character, or text that is not UTF-8, anywhere in
// the row). Such a message has no row: the auditor dead-letters it, a replay skips it and
// the anchored verification does not ask for it. The recipient's subject hash and
// masked form, and the client's hash, leave the payload for the erasable columns; the
// code HMAC and the session id are dropped. An event of an earlier release that carries
// the plaintext address or client IP gets them hashed under the active key of subjects
// (and the address masked), and the plaintext is dropped: no row holds it. Everything
// else stays as it came, fields and types this auditor does not know included, numbers as
// written. stored is when the stream stored the message, the event time when it has no
// ce-time. The same message and keys always give the same row, so a replay rebuilds the
// live log exactly. key (OTP_AUDIT_KEY) derives the row's salt. With nil keys the row's
// chained content (all but its personal data) is still exact, for comparing a row with its
// message.
func ToRow(key []byte, subjects *keys.Subjects, seq uint64, stored time.Time, subject string, header map[string][]string, data []byte) (Row, error) {
	typ, tenant, err := events.SplitSubject(subject)
	if err != nil {
		return Row{}, err
	}
	body, err := storedBody(data)
	if err != nil {
		return Row{}, err
	}
	get := func(h string) string {
		if v := header[h]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	r := Row{StreamSeq: seq, Subject: subject, Type: string(typ), Tenant: tenant,
		EventID: get(events.HeaderID), Source: get(events.HeaderSource)}
	if r.OccurredAt, err = time.Parse(time.RFC3339Nano, get(events.HeaderTime)); err != nil {
		r.OccurredAt = stored
	}
	r.OccurredAt = r.OccurredAt.UTC().Truncate(time.Microsecond) // what PostgreSQL keeps
	// A field of another JSON type than the contract's reads as empty, as it always has:
	// the row is kept all the same.
	var k rowKeys
	_ = json.Unmarshal(data, &k)
	r.RequestID, r.ChallengeID = k.RequestID, k.ChallengeID
	// A known type that does not decode into its payload is kept uninterpreted.
	r.Event, _ = events.DecodeEventOf(typ, data)
	// take removes a field from the payload and reports whether it was a string there.
	take := func(f string) bool {
		_, isString := body[f].(string)
		_, present := body[f]
		delete(body, f)
		return present && isString
	}
	if take("recipient_hash") && k.RecipientHash != "" {
		r.RecipientHash = []byte(k.RecipientHash)
	}
	if take("recipient_masked") {
		r.RecipientMasked = k.RecipientMasked
	}
	if take("recipient") && k.Recipient != "" {
		if r.RecipientHash == nil && subjects != nil {
			r.RecipientHash = []byte(subjects.Subject(tenant, k.Recipient))
		}
		if r.RecipientMasked == "" {
			r.RecipientMasked = Mask(k.Recipient)
		}
	}
	client := ""
	if take("client_hash") {
		client = k.ClientHash
	}
	if take("client_ip") && k.ClientIP != "" && client == "" && subjects != nil {
		client = subjects.Client(tenant, k.ClientIP)
	}
	if client != "" {
		r.PII = map[string]string{"client_hash": client}
	}
	// An alert names the person or client network it counted by subject hash: erasable
	// with the rest, so an erasure of that person clears it.
	if take("subject_hash") && k.SubjectHash != "" {
		if r.PII == nil {
			r.PII = map[string]string{}
		}
		r.PII["subject_hash"] = k.SubjectHash
	}
	for _, f := range droppedFields {
		delete(body, f)
	}
	if r.Payload, err = json.Marshal(body); err != nil {
		return Row{}, err
	}
	// json.Marshal sorts a map's keys and writes the numbers storedBody kept as they
	// were: the payload is already in the form canonical gives (FuzzToRow).
	r.payloadCanonical = true
	if err := storable(&r, body); err != nil {
		return Row{}, err
	}
	// The salt is derived from the audit key and the sequence (a replay must rebuild the
	// same row); it is erased with the personal data, so the digest left in the chain
	// cannot be matched against guesses by anyone without the key.
	r.PIISalt = piiSalt(key, seq)
	r.PIIDigest = piiDigest(r.PIISalt, r.RecipientHash, r.RecipientMasked, r.PII)
	return r, nil
}

// storable refuses a row PostgreSQL would refuse: text columns and JSON strings (keys
// included) hold no NUL character and only UTF-8. Deciding it here, from the message
// alone, keeps the live log, a replay and the anchored verification in agreement about
// which messages have a row. The error names the field, never its value.
func storable(r *Row, body map[string]any) error {
	for _, f := range []struct{ name, value string }{
		{"subject", r.Subject}, {events.HeaderID + " header", r.EventID}, {events.HeaderSource + " header", r.Source},
		{"request_id", r.RequestID}, {"challenge_id", r.ChallengeID}, {"recipient_masked", r.RecipientMasked},
	} {
		if !storableText(f.value) {
			return fmt.Errorf("%s holds a NUL character or is not UTF-8: the audit log cannot store it", f.name)
		}
	}
	for k, v := range r.PII {
		if !storableText(v) {
			return fmt.Errorf("%s holds a NUL character: the audit log cannot store it", k)
		}
	}
	if field := unstorableField("", body); field != "" {
		return fmt.Errorf("field %s holds a NUL character: the audit log cannot store it", field)
	}
	return nil
}

func storableText(s string) bool { return strings.IndexByte(s, 0) < 0 && utf8.ValidString(s) }

// unstorableField returns the path of the first string or key under v that PostgreSQL's
// jsonb refuses (a NUL character; the JSON decoder already made the rest UTF-8), or "".
func unstorableField(path string, v any) string {
	switch v := v.(type) {
	case string:
		if !storableText(v) {
			return path
		}
	case map[string]any:
		for k, e := range v {
			p := strings.TrimPrefix(path+"."+k, ".")
			if !storableText(k) {
				return p
			}
			if f := unstorableField(p, e); f != "" {
				return f
			}
		}
	case []any:
		for i, e := range v {
			if f := unstorableField(fmt.Sprintf("%s[%d]", path, i), e); f != "" {
				return f
			}
		}
	}
	return ""
}

// storedBody decodes a message body into the form the log keeps: one JSON object, any
// fields. Integers keep every digit (an unknown field may hold more than a float64 does);
// other numbers read as float64, in the form PostgreSQL's jsonb gives back, as always.
func storedBody(data []byte) (map[string]any, error) {
	var decodeErr error
	if len(data) <= events.MaxEventSize {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.UseNumber()
		var body map[string]any
		switch err := dec.Decode(&body); {
		case err != nil:
			decodeErr = err
		case !onlyJSONSpace(data[dec.InputOffset():]):
			decodeErr = errors.New("data after the JSON object")
		default:
			for k, v := range body {
				body[k] = storedNumbers(v)
			}
			return body, nil
		}
	}
	// Not one JSON object, or too large: events.DecodeEvent says why, in the reasons
	// every consumer gives. The messages that are fine are decoded once.
	var check map[string]json.RawMessage
	if err := events.DecodeEvent(data, &check); err != nil {
		return nil, err
	}
	return nil, decodeErr
}

// onlyJSONSpace reports whether b holds nothing but JSON's whitespace: what may follow
// the one value of a message.
func onlyJSONSpace(b []byte) bool {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return false
		}
	}
	return true
}

// storedNumbers keeps integers as written and turns other numbers into float64.
func storedNumbers(v any) any {
	switch v := v.(type) {
	case json.Number:
		if integer(v.String()) {
			return v
		}
		f, _ := v.Float64()
		return f
	case map[string]any:
		for k, e := range v {
			v[k] = storedNumbers(e)
		}
	case []any:
		for i, e := range v {
			v[i] = storedNumbers(e)
		}
	}
	return v
}

// integer reports whether a JSON number is written as an integer: digits, perhaps a minus.
func integer(s string) bool {
	s = strings.TrimPrefix(s, "-")
	return s != "" && strings.Trim(s, "0123456789") == ""
}

// piiSalt derives a row's salt from the audit key and its stream sequence.
func piiSalt(key []byte, seq uint64) []byte {
	m := hmac.New(sha256.New, key)
	fmt.Fprintf(m, "otpflow-audit-pii-salt:%d", seq)
	return m.Sum(nil)[:16]
}

// RecipientHash is HMAC-SHA256(key, canonical address): the recipient hash of rows
// written before this release, under OTP_AUDIT_KEY. Rows now hold the subject hash
// (keys.Subjects).
func RecipientHash(key []byte, addr string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(events.CanonicalAddress(addr)))
	return m.Sum(nil)
}

// SubjectHashes are the recipient hashes under which the rows of addr in tenant may be
// stored: its subject hash under every key of the ring, active first.
func SubjectHashes(subjects *keys.Subjects, tenant, addr string) [][]byte {
	var out [][]byte
	for _, h := range subjects.SubjectHashes(tenant, addr) {
		out = append(out, []byte(h))
	}
	return out
}

// Mask keeps the first character of the local part and the domain: a***@example.com
// (events.MaskAddress).
func Mask(addr string) string { return events.MaskAddress(addr) }

// handleBatch chains a batch of events in one transaction, in stream order. An event the
// log cannot keep (ToRow) is dead-lettered and has no row. If the transaction fails, the
// error goes back to the consumer, which is ordered: it runs the events again one at a
// time in stream order up to the first that fails, and tries that one again in place
// with the events after it held behind it, so the chain keeps stream order. A database
// outage is waited out and dead-letters nothing; an event the database refuses goes to
// OTP_DLQ at once (it has no row, which the anchored verification reports: ToRow is where
// what cannot be stored is foreseen); one that keeps failing while the database answers
// goes there after its retries (the consumer's MaxDeliver).
func (s *Service) handleBatch(ctx context.Context, batch []*platform.Delivery) error {
	var rows []*Row
	var data [][]byte
	var good []*platform.Delivery
	for _, d := range batch {
		_, span := d.StartSpan(ctx, s.cfg.Tracer, "audit")
		defer span.End() // the batch is chained together: its spans end together
		md := d.Meta()
		row, err := ToRow(s.cfg.RecipientKey, s.cfg.Subjects, md.Sequence, md.Timestamp, d.Subject(), d.Headers(), d.Data())
		if err != nil {
			_, tenant, _ := events.SplitSubject(d.Subject())
			s.log.Error("undecodable event", "seq", md.Sequence, "err", err)
			span.SetStatus(codes.Error, "undecodable event")
			d.Settle(platform.DeadLetter(tenant, "auditor: "+err.Error()))
			continue
		}
		rows = append(rows, &row)
		data = append(data, d.Data())
		good = append(good, d)
	}
	if len(good) == 0 {
		return nil
	}
	// A redrive of an event the auditor gave up brings the original's row (redrive.go).
	rb, err := s.prepareRedrives(ctx, rows, data)
	if err != nil {
		return err
	}
	w, wrote, alerts, err := s.appendBatch(ctx, rows, rb)
	if _, refused := platform.RefusedByDatabase(err); refused && len(good) == 1 && rb.giveBack() {
		// The event alone (the consumer runs a batch it cannot write one event at a
		// time) is a redrive whose original the database refused again: the reference
		// is chained alone, and the original goes back to OTP_DLQ.
		w, wrote, alerts, err = s.appendBatch(ctx, rows, rb)
	}
	if err != nil {
		return fmt.Errorf("write %d audit rows: %w", len(good), err)
	}
	s.redrivesSettled(rb, wrote)
	s.reputation.wrote(wrote)
	if w.Rows > 0 {
		s.anchor.wrote(w)
	}
	for _, a := range alerts { // committed with the rows
		s.alerts.raised.WithLabelValues(a.rule).Inc()
	}
	// An erasure is done once its row is chained (every earlier row is there too) and
	// before it is acknowledged. One that waits for an earlier event goes back to the
	// stream on its own (its row stays chained; the events after it go on, they are
	// chained already); one that fails leaves itself and the rest unacknowledged, and the
	// batch is run again: its rows are then skipped as already written.
	inBatch := map[uint64]bool{}
	for _, r := range rows {
		inBatch[r.StreamSeq] = true
	}
	for i, d := range good {
		if err := s.eraseRow(ctx, rows[i], inBatch); errors.Is(err, errEarlierUnwritten) {
			s.log.Warn("erasure waits for an earlier event", "seq", rows[i].StreamSeq, "err", err)
			d.Settle(platform.Failed(err))
			continue
		} else if err != nil {
			return err
		}
		typ, _, _ := events.SplitSubject(d.Subject())
		s.written.WithLabelValues(string(typ)).Inc()
		d.Settle(platform.Ack())
	}
	if n, err := s.alerts.prune(ctx, s.pool, rows); err != nil {
		s.log.Warn("prune alert windows", "err", err)
	} else if n > 0 {
		s.log.Debug("pruned alert windows", "rows", n)
	}
	return nil
}

// appendBatch chains rows, with the originals their redrive references bring (rb), and
// the alerts the rows raise, in one transaction (raiseAlerts). An original's row raises
// no alert: its time is past, and the windows count forward.
func (s *Service) appendBatch(ctx context.Context, rows []*Row, rb *redriveBatch) (Written, []*Row, []raisedAlert, error) {
	var alerts []raisedAlert
	var wrote []*Row
	w, err := s.cfg.Chain.AppendAround(ctx, s.pool, rb.chain(rows), s.redriveBefore(rb), func(ctx context.Context, tx pgx.Tx, written []*Row) (err error) {
		wrote = written
		current := make([]*Row, 0, len(written))
		for _, r := range written {
			if rb.originals[r] == nil {
				current = append(current, r)
			}
		}
		if alerts, err = s.raiseAlerts(ctx, tx, current); err != nil {
			return err
		}
		return s.redriveThen(ctx, rb)
	})
	if err != nil {
		return Written{}, nil, nil, err
	}
	return w, wrote, alerts, nil
}

// raiseAlerts adds the rows just written in tx to the alert windows and publishes the
// alerts they raise before tx commits, so that an alert recorded as raised has reached
// the stream. A failed publish rolls the batch back to be written again, held in order
// as while a neighbour is down (ErrUnavailable); a publish whose
// commit then fails is repeated under the same Nats-Msg-Id (rule, key and window start),
// which the stream's duplicate window drops.
func (s *Service) raiseAlerts(ctx context.Context, tx pgx.Tx, wrote []*Row) ([]raisedAlert, error) {
	alerts, err := s.alerts.evaluate(ctx, tx, wrote)
	if err != nil || len(alerts) == 0 {
		return nil, err
	}
	msgs := make([]*nats.Msg, len(alerts))
	for i, a := range alerts {
		msgs[i] = a.msg
	}
	if err := platform.PublishAll(ctx, s.js, msgs); err != nil {
		// Never the events' fault, whatever JetStream answered: the batch is held in
		// order until the alerts go out, not dead-lettered after its retries.
		return nil, fmt.Errorf("publish alerts: %w: %w", platform.ErrUnavailable, err)
	}
	return alerts, nil
}
