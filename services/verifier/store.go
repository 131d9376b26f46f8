package verifier

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/window"
	"github.com/prometheus/client_golang/prometheus"
)

// Statuses of a projected challenge. Only an active challenge can still be verified.
const (
	statusActive     = "active"
	statusVerified   = "verified"
	statusLocked     = "locked"
	statusSuperseded = "superseded"
)

// store holds the verifier's SQL: the projection of issued challenges and their codes,
// the attempt counters and failure stamps a verify takes row locks on, the verify limits,
// and the outbox the verify events leave through.
type store struct {
	pool   *pgxpool.Pool
	outbox *outbox.Outbox
	// groupRetries counts verify transactions run again after a deadlock or a
	// serialization failure.
	groupRetries prometheus.Counter
	// purgeBatch bounds the rows of one status purge statement (tests shorten it);
	// default statusPurgeBatch.
	purgeBatch int
}

// challenge is a projected challenge as a verify finds it, its row locked.
type challenge struct {
	id, status, sessionID string
	// recipientKeys are the recipient's subject hashes, one per key of the ring when the
	// challenge was projected, so the failure cap holds across a key rotation.
	recipientKeys         []string
	attempts, maxAttempts int
	test                  bool
	// traceParent is that of the newest code's otp.challenge: the issuance's span.
	traceParent string
	// failures are the recipient's failed verifications across challenges, oldest
	// first, their rows locked too: read only for an active challenge with recipient keys.
	failures window.Stamps
}

// code is one stored code of a challenge.
type code struct {
	seq     int
	mac     []byte
	keyID   string
	expires time.Time
}

// decision is what a verify rule decided, written by the store in the verify's
// transaction.
type decision struct {
	reply events.VerifyReply // for the caller; the store does not read it
	// status, when set, is the challenge's new status, written with attempts.
	status   string
	attempts int
	// failures, when set, replace the recipient's failure stamps.
	failures window.Stamps
	// events go to the outbox in the same transaction.
	events []*nats.Msg
}

// verifyRule decides one verify. now is the database clock, read once the group's
// challenge row locks were taken: a verify that waited for a lock is judged at the time it
// runs. c is nil when no challenge is projected for the request; it is the challenge as
// the verifies before this one in the group left it. recent reads the challenge's n newest
// codes, newest first, in the same transaction.
type verifyRule func(now time.Time, c *challenge, recent func(n int) ([]code, error)) (decision, error)

// verifyItem is one verify of a group: the request it is for, its rule, and what the
// group made of it.
type verifyItem struct {
	tenant, requestID string
	// answerMissing runs rule with a nil challenge when none is projected; otherwise the
	// item is left notProjected.
	answerMissing bool
	// recent is how many codes rule will likely read; they are read with the locks.
	recent int
	rule   verifyRule

	notProjected bool
	// err is rule's error: the item's decision was dropped, the rest of the group stands.
	err error
}

// challengeRef names a challenge as a verify does.
type challengeRef struct{ tenant, requestID string }

// failureRef names one row of a recipient's failure stamps.
type failureRef struct{ tenant, key string }

// verifyGroup runs the rules of items, in their order, in one transaction, and writes what
// they decided: the challenges' attempts and statuses, the recipients' failure stamps and
// the events, whose outbox entries it returns for publishing after the commit. One commit
// for many verifies is what lets verification keep up with issuance.
//
// Attempts stay exact: the transaction holds the row lock of every challenge of the group
// and of every failure row of their recipients, and runs the rules one after the other
// against the state the ones before left, so two verifies of one challenge in one group
// count like two in a row. Locks are taken in one order: challenges by (tenant,
// request_id), then failure rows by (tenant, key), both bytewise, so two groups never wait
// on each other crosswise; the projection and the erasure take challenge rows in that
// order too. A transaction PostgreSQL still aborts as a deadlock or a serialization
// failure (a purge, an operator's statement) is run again, up to three times.
//
// With lockTimeout > 0, a row another transaction holds is waited for at most that long:
// then the group fails before its commit (errBeforeCommit, over SQLSTATE 55P03) and the
// caller can run its calls one by one, so one held row does not stall the verifies of
// other challenges. 0 waits as long as ctx allows.
func (st *store) verifyGroup(ctx context.Context, items []*verifyItem, lockTimeout time.Duration) ([]outbox.Entry, error) {
	for attempt := 1; ; attempt++ {
		entries, err := st.verifyGroupOnce(ctx, items, lockTimeout)
		var pgErr *pgconn.PgError
		if err == nil || attempt == 3 || !errors.As(err, &pgErr) || (pgErr.Code != "40P01" && pgErr.Code != "40001") {
			return entries, err
		}
		st.groupRetries.Inc()
	}
}

func (st *store) verifyGroupOnce(ctx context.Context, items []*verifyItem, lockTimeout time.Duration) ([]outbox.Entry, error) {
	refs := make([]challengeRef, 0, len(items))
	want := map[challengeRef]int{} // codes to read per challenge
	for _, it := range items {
		it.notProjected, it.err = false, nil
		r := challengeRef{it.tenant, it.requestID}
		if _, ok := want[r]; !ok {
			refs = append(refs, r)
		}
		want[r] = max(want[r], it.recent)
	}
	slices.SortFunc(refs, func(a, b challengeRef) int {
		return cmp.Or(strings.Compare(a.tenant, b.tenant), strings.Compare(a.requestID, b.requestID))
	})
	var entries []outbox.Entry
	err := pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		err := st.verifyInTx(ctx, tx, items, refs, want, lockTimeout, &entries)
		if err != nil {
			return &errBeforeCommit{err}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return entries, nil
}

// errBeforeCommit is a verify group's failure before its COMMIT was sent: nothing of it
// was written, so its calls may run again.
type errBeforeCommit struct{ err error }

func (e *errBeforeCommit) Error() string { return e.err.Error() }
func (e *errBeforeCommit) Unwrap() error { return e.err }

// verifyInTx is verifyGroupOnce's transaction.
func (st *store) verifyInTx(ctx context.Context, tx pgx.Tx, items []*verifyItem, refs []challengeRef, want map[challengeRef]int,
	lockTimeout time.Duration, entries *[]outbox.Entry) error {
	// The challenges' row locks, in order, then the clock: one round trip.
	states := map[challengeRef]*challenge{}
	b := &pgx.Batch{}
	if lockTimeout > 0 {
		b.Queue(fmt.Sprintf(`SET LOCAL lock_timeout = %d`, lockTimeout.Milliseconds()))
	}
	for _, r := range refs {
		b.Queue(`SELECT challenge_id::text, attempts, max_attempts, status, session_id, recipient_keys, test,
				coalesce((SELECT k.trace_parent FROM verifier.codes k WHERE k.challenge_id = c.challenge_id ORDER BY k.code_seq DESC LIMIT 1), '')
			FROM verifier.challenges c WHERE tenant = $1 AND request_id = $2 FOR UPDATE OF c`, r.tenant, r.requestID).
			QueryRow(func(row pgx.Row) error {
				c := &challenge{}
				err := row.Scan(&c.id, &c.attempts, &c.maxAttempts, &c.status, &c.sessionID, &c.recipientKeys, &c.test, &c.traceParent)
				if errors.Is(err, pgx.ErrNoRows) {
					return nil
				}
				states[r] = c
				return err
			})
	}
	var now time.Time
	b.Queue(`SELECT clock_timestamp()`).QueryRow(func(row pgx.Row) error { return row.Scan(&now) })
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return err
	}
	now = now.UTC()

	// The failure rows of the active challenges' recipients, created if need be and
	// locked in order, and the codes of the active challenges: one round trip.
	var frefs []failureRef
	for _, r := range refs {
		if c := states[r]; c != nil && c.status == statusActive {
			for _, k := range c.recipientKeys {
				frefs = append(frefs, failureRef{r.tenant, k})
			}
		}
	}
	slices.SortFunc(frefs, func(a, b failureRef) int {
		return cmp.Or(strings.Compare(a.tenant, b.tenant), strings.Compare(a.key, b.key))
	})
	frefs = slices.Compact(frefs)
	stamps := map[failureRef]window.Stamps{}
	codes := map[string][]code{}
	b = &pgx.Batch{}
	if len(frefs) > 0 {
		ts, ks := make([]string, len(frefs)), make([]string, len(frefs))
		for i, f := range frefs {
			ts[i], ks[i] = f.tenant, f.key
		}
		// Insert or lock, in one statement and in order: a row is created if missing
		// and locked if not, also when a purge deletes it meanwhile (the insert then
		// goes through), so every verify of the recipient waits for this one. The
		// no-op update writes a new version of the row; measured, that costs less than
		// locking without a write and reading the rows with a second statement (2,940
		// against 3,730 verifies/s in otpflow bench on the 2-core box).
		b.Queue(`INSERT INTO verifier.recipient_failures AS f (tenant, recipient_key)
			SELECT t, k FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(t, k, i) ORDER BY i
			ON CONFLICT (tenant, recipient_key) DO UPDATE SET stamps = f.stamps
			RETURNING tenant, recipient_key, stamps`, ts, ks).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var f failureRef
				var st []time.Time
				if err := rows.Scan(&f.tenant, &f.key, &st); err != nil {
					return err
				}
				stamps[f] = st
			}
			return rows.Err()
		})
	}
	for _, r := range refs {
		if c := states[r]; c != nil && c.status == statusActive && want[r] > 0 {
			queueRecentCodes(b, c.id, want[r], func(cs []code) { codes[c.id] = cs })
		}
	}
	if b.Len() > 0 {
		if err := tx.SendBatch(ctx, b).Close(); err != nil {
			return err
		}
	}

	// The rules, one after the other, each against the state the ones before left.
	dirty := map[string]*challenge{}
	dirtyFailures := map[failureRef]bool{}
	var msgs []*nats.Msg
	for _, it := range items {
		c := states[challengeRef{it.tenant, it.requestID}]
		if c == nil && !it.answerMissing {
			it.notProjected = true
			continue
		}
		var view *challenge
		if c != nil {
			v := *c
			v.failures = nil
			if v.status == statusActive {
				// A recipient is known here only by its subject hashes (OTP_SUBJECT_KEY),
				// one per key of the ring when its challenge was projected; the cap decides
				// on the merge of the rows under every hash and writes the whole state back
				// under each, so it holds across a key rotation, also while verifiers with
				// the old and the new ring run side by side.
				for _, k := range v.recipientKeys {
					v.failures = window.Merge(v.failures, stamps[failureRef{it.tenant, k}])
				}
			}
			view = &v
		}
		d, err := it.rule(now, view, func(n int) ([]code, error) {
			if have := codes[view.id]; n <= want[challengeRef{it.tenant, it.requestID}] {
				return have[:min(n, len(have))], nil
			}
			return recentCodes(ctx, tx, view.id, n)
		})
		if err != nil {
			it.err = err
			continue
		}
		if c != nil && d.status != "" {
			c.attempts, c.status = d.attempts, d.status
			dirty[c.id] = c
		}
		if c != nil && len(c.recipientKeys) > 0 && d.failures != nil {
			for _, k := range c.recipientKeys {
				f := failureRef{it.tenant, k}
				stamps[f] = slices.Clone(d.failures)
				dirtyFailures[f] = true
			}
		}
		msgs = append(msgs, d.events...)
	}

	// What they decided, written in one round trip, then the events' outbox rows.
	b = &pgx.Batch{}
	for _, r := range refs {
		if c := states[r]; c != nil && dirty[c.id] != nil {
			b.Queue(`UPDATE verifier.challenges SET attempts = $2, status = $3, updated_at = now() WHERE challenge_id = $1`,
				c.id, c.attempts, c.status)
		}
	}
	for _, f := range frefs {
		if dirtyFailures[f] {
			b.Queue(`UPDATE verifier.recipient_failures SET stamps = $3 WHERE tenant = $1 AND recipient_key = $2`,
				f.tenant, f.key, []time.Time(stamps[f]))
		}
	}
	if b.Len() > 0 {
		if err := tx.SendBatch(ctx, b).Close(); err != nil {
			return err
		}
	}
	var err error
	*entries, err = st.outbox.Add(ctx, tx, msgs...)
	return err
}

const recentCodesSQL = `SELECT code_seq, code_hmac, pepper_key_id, expires_at FROM verifier.codes
	WHERE challenge_id = $1 ORDER BY code_seq DESC LIMIT $2`

func scanCode(r pgx.CollectableRow) (code, error) {
	var c code
	return c, r.Scan(&c.seq, &c.mac, &c.keyID, &c.expires)
}

// queueRecentCodes queues on b the read of a challenge's n newest codes, newest first.
func queueRecentCodes(b *pgx.Batch, challengeID string, n int, got func([]code)) {
	b.Queue(recentCodesSQL, challengeID, n).Query(func(rows pgx.Rows) error {
		cs, err := pgx.CollectRows(rows, scanCode)
		got(cs)
		return err
	})
}

// recentCodes returns the n newest codes of a challenge, newest first.
func recentCodes(ctx context.Context, tx pgx.Tx, challengeID string, n int) ([]code, error) {
	rows, err := tx.Query(ctx, recentCodesSQL, challengeID, n)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, scanCode)
}

// project writes a batch of checked events in one transaction. A code whose challenge id
// the projection holds for another request writes nothing and gets its refused set; the
// rest of the batch is written.
//
// A supersession is written whatever the order it arrives in: for a challenge not yet
// projected it writes the challenge as superseded, and the challenge's codes, projected
// later, join it closed. So no order of delivery, redelivery or relay lets a superseded
// code verify.
//
// The writes are set-based, a statement per kind of row whatever the batch's size: the
// erasure locks, the challenge rows, then the codes, in one round trip; then, in a
// second, the updates of existing challenge rows, which take their row locks.
func (st *store) project(ctx context.Context, items []*projection) error {
	var (
		lt, lh []string // the erasure locks: tenant and subject hash of every code
		rows   challengeRows
		codes  codeRows
		sups   []*projection
	)
	for _, p := range items {
		p.refused, p.erased = nil, false
		switch {
		case p.challenge != nil:
			for _, h := range p.challenge.RecipientHashes {
				lt, lh = append(lt, p.tenant), append(lh, h)
			}
			rows.addChallenge(p)
			codes.add(p)
		case p.superseded != nil:
			rows.addSuperseded(p)
			sups = append(sups, p)
		}
	}
	if rows.n() == 0 {
		return nil
	}
	return pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		b := &pgx.Batch{}
		// First, before any row lock, a shared lock on the recipient hashes of every code:
		// an erasure takes them exclusively, so it comes wholly before this batch (which
		// then drops the person's codes) or after (and deletes what the batch wrote).
		if len(lh) > 0 {
			platform.QueueErasureLocksShared(b, Schema, lt, lh)
		}
		// Rows are inserted in the stream's order: the first event to name a challenge id
		// holds it.
		b.Queue(insertChallengesSQL, rows.args()...)
		var risky []*projection
		if codes.n() > 0 {
			b.Queue(insertCodesSQL, codes.args()...).Query(func(r pgx.Rows) error {
				for r.Next() {
					var n int
					var own, gone, risk bool
					if err := r.Scan(&n, &own, &gone, &risk); err != nil {
						return err
					}
					p := codes.items[n-1]
					switch {
					case gone:
						p.erased = true
					case !own:
						p.refused = errChallengeOwned
					case risk:
						risky = append(risky, p)
					}
				}
				return r.Err()
			})
		}
		if err := tx.SendBatch(ctx, b).Close(); err != nil {
			return err
		}
		// The updates of existing challenge rows, in the order verify groups lock them,
		// (tenant, request_id) bytewise, so a batch and a group never wait on each other
		// crosswise.
		var updates []rowUpdate
		for _, p := range sups {
			// Scoped to the subject's tenant and the request: an event can only close a
			// challenge it names exactly.
			e := p.superseded
			updates = append(updates, rowUpdate{challengeRef{p.tenant, e.RequestID}, func(b *pgx.Batch) {
				b.Queue(`UPDATE verifier.challenges SET status = 'superseded', updated_at = now()
					WHERE challenge_id = $1 AND tenant = $2 AND request_id = $3 AND status = 'active'`,
					e.ChallengeID, p.tenant, e.RequestID)
			}})
		}
		for _, p := range risky {
			updates = append(updates, riskUpdate(p))
		}
		if len(updates) == 0 {
			return nil
		}
		slices.SortStableFunc(updates, func(a, b rowUpdate) int {
			return cmp.Or(strings.Compare(a.ref.tenant, b.ref.tenant), strings.Compare(a.ref.requestID, b.ref.requestID))
		})
		b = &pgx.Batch{}
		for _, u := range updates {
			u.queue(b)
		}
		return tx.SendBatch(ctx, b).Close()
	})
}

// rowUpdate is an update of a projected challenge row, queued once the batch's inserts
// are.
type rowUpdate struct {
	ref   challengeRef
	queue func(*pgx.Batch)
}

// insertChallengesSQL makes the challenge rows of challengeRows.args, in their order; a
// code's challenge is not made for a person erased after the code was issued
// (verifier.erasures). A challenge id or a request that another row holds makes
// nothing.
const insertChallengesSQL = `INSERT INTO verifier.challenges (tenant, request_id, challenge_id, max_attempts, session_id,
		recipient_keys, test, risk, status)
	SELECT u.t, u.r, u.c, u.m, u.s, ($10::text[])[u.kf:u.kt], u.test, ($11::text[])[u.rf:u.rt], u.st
	FROM unnest($1::text[], $2::text[], $3::uuid[], $4::int[], $5::text[], $6::bool[], $7::text[], $8::timestamptz[],
			$9::int[], $12::int[], $13::int[], $14::int[])
		WITH ORDINALITY AS u(t, r, c, m, s, test, st, issued, kf, kt, rf, rt, n)
	WHERE NOT EXISTS (SELECT 1 FROM verifier.erasures x
		WHERE x.tenant = u.t AND x.recipient_key = ANY (($10::text[])[u.kf:u.kt]) AND x.erased_at >= u.issued)
	ORDER BY u.n
	ON CONFLICT DO NOTHING`

// insertCodesSQL adds the codes of codeRows.args to their challenges and answers, for
// each by its position: whether its challenge is the event's own (tenant, request_id,
// challenge_id), else nothing is written; whether the person was erased after it was
// issued; and whether the recipient_failures risk rule may apply to its challenge (not
// applied yet, no attempt, enough failures of the recipient keys of its row: the
// update's own test, riskUpdate, which checks it again under the row's lock).
const insertCodesSQL = `WITH u AS (
		SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int[], $5::bytea[], $6::text[], $7::timestamptz[],
				$8::timestamptz[], $9::text[], $10::int[], $11::int[], $13::bigint[], $14::bigint[])
			WITH ORDINALITY AS u(t, c, r, seq, hmac, pk, exp, issued, tp, kf, kt, failures, window_us, n)),
	g AS (SELECT u.*, EXISTS (SELECT 1 FROM verifier.erasures x
			WHERE x.tenant = u.t AND x.recipient_key = ANY (($12::text[])[u.kf:u.kt]) AND x.erased_at >= u.issued) AS erased
		FROM u),
	o AS (SELECT g.*, ch.challenge_id AS own, ch.recipient_keys AS row_keys,
			ch.attempts = 0 AND NOT ('recipient_failures' = ANY (ch.risk)) AS open FROM g
		LEFT JOIN verifier.challenges ch ON NOT g.erased AND ch.challenge_id = g.c AND ch.tenant = g.t AND ch.request_id = g.r),
	ins AS (INSERT INTO verifier.codes (challenge_id, code_seq, code_hmac, pepper_key_id, expires_at, issued_at, trace_parent)
		SELECT own, seq, hmac, pk, exp, issued, tp FROM o WHERE own IS NOT NULL ORDER BY n ON CONFLICT DO NOTHING)
	SELECT n, own IS NOT NULL, erased, own IS NOT NULL AND failures > 0 AND open
		AND (SELECT coalesce(max((SELECT count(*) FROM unnest(f.stamps) AS s(t)
				WHERE s.t > now() - window_us * interval '1 microsecond')), 0)
			FROM verifier.recipient_failures f
			WHERE f.tenant = o.t AND f.recipient_key = ANY (o.row_keys)) >= failures
	FROM o ORDER BY n`

// riskUpdate is the recipient_failures risk rule of a challenge's first code, its window
// measured on the database clock. Each hash's row holds the whole state as its writer
// saw it: the fullest counts. insertCodesSQL queues it only for a challenge whose
// recipient had as many failures then; a failure recorded in between counts or not, as
// one recorded while the update runs.
func riskUpdate(p *projection) rowUpdate {
	tenant, e, rf := p.tenant, p.challenge, p.failureRisk
	return rowUpdate{challengeRef{tenant, e.RequestID}, func(b *pgx.Batch) {
		b.Queue(`UPDATE verifier.challenges c SET max_attempts = LEAST(c.max_attempts, $3),
				risk = array_append(c.risk, 'recipient_failures')
			WHERE c.challenge_id = $1 AND c.tenant = $5 AND c.request_id = $6
				AND c.attempts = 0 AND NOT ('recipient_failures' = ANY (c.risk))
				AND (SELECT coalesce(max((SELECT count(*) FROM unnest(f.stamps) AS s(t)
						WHERE s.t > now() - $2::bigint * interval '1 microsecond')), 0)
					FROM verifier.recipient_failures f
					WHERE f.tenant = c.tenant AND f.recipient_key = ANY (c.recipient_keys)) >= $4`,
			e.ChallengeID, rf.window.Microseconds(), rf.maxAttempts, rf.failures, tenant, e.RequestID)
	}}
}

// span is a row's part of a flat array, 1-based and inclusive: from > to is empty. A
// statement's rows each hold an array (recipient hashes, risk labels) as a slice of one
// flat parameter, as unnest cannot take an array of arrays of different lengths.
func span(flat *[]string, add []string) (from, to int32) {
	from = int32(len(*flat)) + 1
	*flat = append(*flat, add...)
	return from, int32(len(*flat))
}

// challengeRows are the challenge rows of a batch, column by column, in the stream's
// order: a code's challenge (active), or a supersession's (superseded, with no code and
// no attempt yet).
type challengeRows struct {
	tenant, requestID, challengeID, sessionID, status []string
	maxAttempts                                       []int32
	test                                              []bool
	issuedAt                                          []*time.Time
	keysFrom, keysTo, riskFrom, riskTo                []int32
	keys, risk                                        []string
}

func (c *challengeRows) n() int { return len(c.tenant) }

func (c *challengeRows) addChallenge(p *projection) {
	e := p.challenge
	c.add(p.tenant, e.RequestID, e.ChallengeID, e.SessionID, "active", int32(e.MaxAttempts), e.Test, &e.IssuedAt,
		e.RecipientHashes, e.Risk)
}

func (c *challengeRows) addSuperseded(p *projection) {
	e := p.superseded
	c.add(p.tenant, e.RequestID, e.ChallengeID, "", "superseded", 0, false, nil, nil, nil)
}

func (c *challengeRows) add(tenant, requestID, challengeID, sessionID, status string, maxAttempts int32, test bool,
	issuedAt *time.Time, keys, risk []string) {
	c.tenant, c.requestID, c.challengeID = append(c.tenant, tenant), append(c.requestID, requestID), append(c.challengeID, challengeID)
	c.sessionID, c.status = append(c.sessionID, sessionID), append(c.status, status)
	c.maxAttempts, c.test, c.issuedAt = append(c.maxAttempts, maxAttempts), append(c.test, test), append(c.issuedAt, issuedAt)
	kf, kt := span(&c.keys, keys)
	rf, rt := span(&c.risk, risk)
	c.keysFrom, c.keysTo, c.riskFrom, c.riskTo = append(c.keysFrom, kf), append(c.keysTo, kt), append(c.riskFrom, rf), append(c.riskTo, rt)
}

// args are insertChallengesSQL's. The flat arrays are never NULL: a slice of NULL is
// NULL, where a row with no hash or label holds an empty array.
func (c *challengeRows) args() []any {
	return []any{c.tenant, c.requestID, c.challengeID, c.maxAttempts, c.sessionID, c.test, c.status, c.issuedAt,
		c.keysFrom, nonNil(c.keys), nonNil(c.risk), c.keysTo, c.riskFrom, c.riskTo}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// codeRows are the codes of a batch, column by column, in the stream's order.
type codeRows struct {
	items                                        []*projection
	tenant, challengeID, requestID, keyID, trace []string
	seq, keysFrom, keysTo                        []int32
	failures                                     []int64
	hmac                                         [][]byte
	expiresAt, issuedAt                          []time.Time
	windowMicros                                 []int64
	keys                                         []string
}

func (c *codeRows) n() int { return len(c.items) }

func (c *codeRows) add(p *projection) {
	e := p.challenge
	c.items = append(c.items, p)
	c.tenant, c.challengeID, c.requestID = append(c.tenant, p.tenant), append(c.challengeID, e.ChallengeID), append(c.requestID, e.RequestID)
	c.seq, c.hmac, c.keyID = append(c.seq, int32(e.CodeSeq)), append(c.hmac, e.CodeHMAC), append(c.keyID, e.PepperKeyID)
	c.expiresAt, c.issuedAt, c.trace = append(c.expiresAt, e.ExpiresAt), append(c.issuedAt, e.IssuedAt), append(c.trace, p.traceParent)
	kf, kt := span(&c.keys, e.RecipientHashes)
	c.keysFrom, c.keysTo = append(c.keysFrom, kf), append(c.keysTo, kt)
	c.failures, c.windowMicros = append(c.failures, int64(p.failureRisk.failures)), append(c.windowMicros, p.failureRisk.window.Microseconds())
}

// args are insertCodesSQL's.
func (c *codeRows) args() []any {
	return []any{c.tenant, c.challengeID, c.requestID, c.seq, c.hmac, c.keyID, c.expiresAt, c.issuedAt, c.trace,
		c.keysFrom, c.keysTo, nonNil(c.keys), c.failures, c.windowMicros}
}

// limitCount is one verify limit's count once a call is counted: hits in the current
// fixed window (the call included), prevHits in the window before, and elapsed since the
// current window started, on the database clock.
type limitCount struct {
	key            []byte
	hits, prevHits int
	elapsed        time.Duration
}

// countLimits counts verify calls, in their order, each against its keys (sorted
// bytewise), in one statement, so the counts hold across replicas; fixed windows of a
// minute start on the database clock. It returns each call's counts as if the calls had
// been counted one after the other: the i-th call of the group for a key sees the hits
// of the ones before it and its own.
func (st *store) countLimits(ctx context.Context, calls [][][]byte) ([][]limitCount, error) {
	n := map[string]int{}
	var keys [][]byte
	for _, ks := range calls {
		for _, k := range ks {
			if n[string(k)] == 0 {
				keys = append(keys, k)
			}
			n[string(k)]++
		}
	}
	if len(keys) == 0 {
		return make([][]limitCount, len(calls)), nil
	}
	// One order for every caller: two groups never wait on each other's rows crosswise.
	slices.SortFunc(keys, bytes.Compare)
	hits := make([]int32, len(keys))
	for i, k := range keys {
		hits[i] = int32(n[string(k)])
	}
	rows, err := st.pool.Query(ctx, `INSERT INTO verifier.verify_limits AS l (key, window_start, hits, prev_hits)
		SELECT k, date_trunc('minute', now()), n, 0 FROM unnest($1::bytea[], $2::int[]) WITH ORDINALITY AS u(k, n, i) ORDER BY i
		ON CONFLICT (key) DO UPDATE SET
			prev_hits = CASE WHEN l.window_start = EXCLUDED.window_start THEN l.prev_hits
			                 WHEN l.window_start = EXCLUDED.window_start - interval '1 minute' THEN l.hits
			                 ELSE 0 END,
			hits = CASE WHEN l.window_start = EXCLUDED.window_start THEN l.hits + EXCLUDED.hits ELSE EXCLUDED.hits END,
			window_start = EXCLUDED.window_start
		RETURNING key, hits, prev_hits, extract(epoch FROM now() - window_start)::float8`, keys, hits)
	if err != nil {
		return nil, err
	}
	totals, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (limitCount, error) {
		var (
			c              limitCount
			elapsedSeconds float64
		)
		err := r.Scan(&c.key, &c.hits, &c.prevHits, &elapsedSeconds)
		c.elapsed = time.Duration(elapsedSeconds * float64(time.Second))
		return c, err
	})
	if err != nil {
		return nil, err
	}
	total := map[string]limitCount{}
	for _, c := range totals {
		total[string(c.key)] = c
	}
	seen := map[string]int{}
	out := make([][]limitCount, len(calls))
	for i, ks := range calls {
		for _, k := range ks {
			t, ok := total[string(k)]
			if !ok {
				return nil, fmt.Errorf("verify limits: no count for a key")
			}
			seen[string(k)]++
			t.hits += seen[string(k)] - n[string(k)]
			out[i] = append(out[i], t)
		}
	}
	return out, nil
}

// purge deletes challenges whose newest code expired, or that were used, locked or
// superseded, more than retention ago, with their codes; failure stamps older than an
// hour; verify-limit windows that no longer count; and the status rows and erased
// challenges of the status projection older than retention (purgeStatus). Every cutoff
// is on the database clock.
func (st *store) purge(ctx context.Context, retention time.Duration) (int64, error) {
	var total int64
	err := pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT c.challenge_id FROM verifier.challenges c
			WHERE (c.status <> 'active' AND c.updated_at < now() - $1::bigint * interval '1 microsecond')
			   OR (NOT EXISTS (SELECT 1 FROM verifier.codes k WHERE k.challenge_id = c.challenge_id
			                   AND k.expires_at >= now() - $1::bigint * interval '1 microsecond')
			       -- a supersession projected before its challenge's codes waits for them
			       AND EXISTS (SELECT 1 FROM verifier.codes k WHERE k.challenge_id = c.challenge_id))
			FOR UPDATE SKIP LOCKED`, retention.Microseconds())
		if err != nil {
			return err
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil || len(ids) == 0 {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM verifier.codes WHERE challenge_id = ANY($1::uuid[])`, ids); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `DELETE FROM verifier.challenges WHERE challenge_id = ANY($1::uuid[])`, ids)
		total = tag.RowsAffected()
		return err
	})
	if err != nil {
		return total, err
	}
	// Rows a verify holds are left for the next purge: a purge never waits on a verify
	// group's locks, so it cannot deadlock with one.
	tag, err := st.pool.Exec(ctx, `DELETE FROM verifier.recipient_failures WHERE (tenant, recipient_key) IN
		(SELECT tenant, recipient_key FROM verifier.recipient_failures
		 WHERE coalesce(stamps[array_upper(stamps, 1)], '-infinity') < now() - interval '1 hour' FOR UPDATE SKIP LOCKED)`)
	if err != nil {
		return total, err
	}
	total += tag.RowsAffected()
	tag, err = st.pool.Exec(ctx, `DELETE FROM verifier.verify_limits WHERE key IN
		(SELECT key FROM verifier.verify_limits WHERE window_start < now() - interval '2 minutes' FOR UPDATE SKIP LOCKED)`)
	if err != nil {
		return total, err
	}
	total += tag.RowsAffected()
	tag, err = st.pool.Exec(ctx, `DELETE FROM verifier.erasures WHERE erased_at < now() - $1::bigint * interval '1 microsecond'`,
		retention.Microseconds())
	if err != nil {
		return total, err
	}
	total += tag.RowsAffected()
	n, err := st.purgeStatus(ctx, retention)
	return total + n, err
}

// errNotProjected means the challenge is not in the projection (yet).
var errNotProjected = errors.New("challenge not projected")
