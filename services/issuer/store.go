package issuer

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/window"
)

// store holds the issuer's SQL: challenges and the HMACs of their codes, the rate-limit
// rows that every issuer replica shares, and the outbox, all written in one transaction
// per batch.
type store struct {
	pool   *pgxpool.Pool
	outbox *outbox.Outbox
	// skew shifts the database clock; tests move time with it. It returns 0 in production.
	skew func() time.Duration
}

// horizon is how far back the batch state reaches: the longest window a rule looks
// over (the hourly limits, recipient bursts, the ip fanout).
const horizon = time.Hour

// batchKeys names the rows one batch decides on. Recipients and clients are named by
// their hash under the active subject key, each with its hashes under every key.
type batchKeys struct {
	challenges map[key]bool
	recipients map[rcptKey][]string // every hash of the recipient, active first
	// logs maps each rate_log key under the active hash to the keys under every hash.
	logs    map[string][]string
	windows map[string]bool // rate_window keys
	// clients maps each client of the batch to its hashes and its tenant's ip fanout
	// window: the recipients it asked codes for within it are read.
	clients map[clientKey]clientRows
	// messages are the resend messages of the batch (decide): those already handled are read.
	messages map[msgKey]bool
}

// clientKey names one client network of one tenant by its active hash.
type clientKey struct{ tenant, ip string }

// clientRows is how a client's ip_recipients rows are found.
type clientRows struct {
	hashes []string // every hash of the client, active first
	window time.Duration
}

// challenge is the locked state of one (tenant, request_id) inside a batch transaction.
type challenge struct {
	id         string
	codeCount  int
	lastCodeAt time.Time
	status     string
	recipient  string // subject hash: what requests are compared with; "" before the hashes
	purpose    string
	isNew      bool
	// address is where the challenge's codes go, as it was created; stored only sealed
	// (sealKeyID, sealed) and opened for a resend.
	address   string
	sealKeyID string
	sealed    []byte
}

// batchState is everything the decisions of one batch read and change, loaded under row
// locks so that several issuer processes decide as if they were one.
type batchState struct {
	now        time.Time // the database clock once the rows are locked
	challenges map[key]*challenge
	logs       map[string]window.Stamps  // rate_log rows: send times per key, merged over its hashes
	logKeys    map[string][]string       // the rate_log rows of each key, one per hash
	windows    map[string]*rateWindow    // rate_window rows
	active     map[rcptKey][]activeRef   // active unexpired challenges per recipient
	recent     map[rcptKey]window.Stamps // creation times of recent challenges
	ipSeen     map[clientKey]seenSet     // recipients seen in the fanout window
	// erased is when each recipient of the batch was last erased (issuer.erasures).
	erased map[rcptKey]time.Time
	// suppressed are the batch's recipients on the suppression list, with their entries
	// under every key (issuer.suppressions), lapsed ones included: the decision judges
	// them on its clock and the tenant's expiry.
	suppressed map[rcptKey][]suppression
	// handled are the resend messages of the batch already decided (issuer.resend_messages).
	handled map[msgKey]bool
}

type rateWindow struct {
	start time.Time
	count int
}

type activeRef struct{ id, requestID string }

// writes is what the decisions of a batch commit: challenge and code rows in the order
// decided (a challenge is inserted before a later request of the batch supersedes it),
// the rate-limit rows they changed in the batch state, and the messages for the outbox.
type writes struct {
	rows    []rowWrite
	logs    map[string]bool // rate_log rows to store from the batch state
	windows map[string]bool // rate_window rows to store from the batch state
	clients []ipRecipient   // ip_recipients to stamp with the batch clock
	msgs    []*nats.Msg
}

func (w *writes) add(r rowWrite)            { w.rows = append(w.rows, r) }
func (w *writes) publish(msgs ...*nats.Msg) { w.msgs = append(w.msgs, msgs...) }

// A rowWrite is one row a decision writes: supersession, newChallenge, nextCode or codeRow.
type rowWrite interface{ queue(b *pgx.Batch) }

// handledMessage records that the resend message key was decided.
type handledMessage struct {
	key       msgKey
	recipient string // the subject hash, for an erasure
	at        time.Time
}

func (r handledMessage) queue(b *pgx.Batch) {
	// No ON CONFLICT: a replica that decided the same message at the same time (a
	// redelivery while the first handling still ran) fails its transaction, and its retry
	// reads the row.
	b.Queue(`INSERT INTO issuer.resend_messages (tenant, message_hash, recipient_key, handled_at) VALUES ($1, $2, $3, $4)`,
		r.key.tenant, r.key.hash, r.recipient, r.at)
}

// supersession closes challengeID in favour of the challenge of request by.
type supersession struct{ challengeID, by string }

// newChallenge is a challenge row as its first code creates it.
type newChallenge struct {
	tenant, requestID, id string
	recipient             string // the subject hash
	sealKeyID             string // the address, sealed
	sealed                []byte
	purpose, locale       string
	sessionID             string
	codeCount             int
	createdAt, expiresAt  time.Time
	test                  bool
}

// nextCode moves an existing challenge on to its code number codeCount.
type nextCode struct {
	id                  string
	codeCount           int
	issuedAt, expiresAt time.Time
}

// codeRow is the HMAC of one code.
type codeRow struct {
	challengeID         string
	seq                 int
	hmac                []byte
	pepperID            string
	issuedAt, expiresAt time.Time
}

func (r supersession) queue(b *pgx.Batch) {
	b.Queue(`UPDATE issuer.challenges SET status = 'superseded', superseded_by = $2 WHERE challenge_id = $1`, r.challengeID, r.by)
}

func (r newChallenge) queue(b *pgx.Batch) {
	b.Queue(`INSERT INTO issuer.challenges (tenant, request_id, challenge_id, recipient_sealed, recipient_seal_key_id,
			recipient_key, purpose, locale, session_id, code_count, last_code_at, expires_at, created_at, test)
			VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$11,$13)`,
		r.tenant, r.requestID, r.id, r.sealed, r.sealKeyID, r.recipient, r.purpose, r.locale,
		r.sessionID, r.codeCount, r.createdAt, r.expiresAt, r.test)
}

func (r nextCode) queue(b *pgx.Batch) {
	b.Queue(`UPDATE issuer.challenges SET code_count = $2, last_code_at = $3, expires_at = $4
			WHERE challenge_id = $1`, r.id, r.codeCount, r.issuedAt, r.expiresAt)
}

func (r codeRow) queue(b *pgx.Batch) {
	b.Queue(`INSERT INTO issuer.codes (challenge_id, code_seq, code_hmac, pepper_key_id, issued_at, expires_at)
		VALUES ($1,$2,$3,$4,$5,$6)`, r.challengeID, r.seq, r.hmac, r.pepperID, r.issuedAt, r.expiresAt)
}

// issueBatch runs decide on the rows of keys in one transaction and commits what it
// records: the database clock is read, the rows are locked (each set in sorted order, so
// that issuers never deadlock) and read, and the clock is read again as the last
// statement, so that an issuer that waited for another's locks decides after it, never in
// its past. It returns the outbox entries committed, for publishing at once.
func (st *store) issueBatch(ctx context.Context, keys batchKeys, decide func(*batchState, *writes) error) ([]outbox.Entry, error) {
	var entries []outbox.Entry
	err := pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		entries = nil
		start, err := st.clock(ctx, tx)
		if err != nil {
			return err
		}
		bs, err := st.lock(ctx, tx, keys, start)
		if err != nil {
			return err
		}
		w := &writes{logs: map[string]bool{}, windows: map[string]bool{}}
		if err := decide(bs, w); err != nil {
			return err
		}
		if err := tx.SendBatch(ctx, st.writeBatch(bs, w)).Close(); err != nil {
			return fmt.Errorf("write challenges: %w", err)
		}
		entries, err = st.outbox.Add(ctx, tx, w.msgs...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return entries, nil
}

// clock reads the database clock inside tx: every issuer replica, dispatcher and verifier
// then agree on when a code expires, whatever each host's clock says.
func (st *store) clock(ctx context.Context, tx pgx.Tx) (time.Time, error) {
	var now time.Time
	if err := tx.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
		return time.Time{}, fmt.Errorf("read the database clock: %w", err)
	}
	return now.Add(st.skew()).UTC(), nil
}

// lock reads and row-locks the batch's challenges, then its rate-limit rows, each set in
// sorted order, reads the rest of what the rules need (windows as of start), and then
// the database clock.
func (st *store) lock(ctx context.Context, tx pgx.Tx, keys batchKeys, start time.Time) (*batchState, error) {
	bs := &batchState{challenges: map[key]*challenge{}, logs: map[string]window.Stamps{}, logKeys: keys.logs,
		windows: map[string]*rateWindow{}, active: map[rcptKey][]activeRef{}, recent: map[rcptKey]window.Stamps{},
		ipSeen: map[clientKey]seenSet{}, erased: map[rcptKey]time.Time{}, suppressed: map[rcptKey][]suppression{}, handled: map[msgKey]bool{}}
	ks := make([]key, 0, len(keys.challenges))
	for k := range keys.challenges {
		bs.challenges[k] = nil
		ks = append(ks, k)
	}
	slices.SortFunc(ks, func(a, b key) int {
		if c := strings.Compare(a.tenant, b.tenant); c != 0 {
			return c
		}
		return strings.Compare(a.requestID, b.requestID)
	})
	// Set-based reads, a handful of statements per batch whatever its size. Rows are
	// locked in key order (the sort runs below the row locks).
	var tenants, requestIDs []string
	for _, k := range ks {
		tenants, requestIDs = append(tenants, k.tenant), append(requestIDs, k.requestID)
	}
	// Every hash of a key is read and locked; rows are found back by their active hash.
	logOf := map[string]string{}
	for k, all := range keys.logs {
		for _, p := range all {
			logOf[p] = k
		}
	}
	sortedLogs, sortedWins := sortedKeys(logOf), sortedKeys(keys.windows)
	var rt, rr, rp, ra []string
	for rk, hashes := range keys.recipients {
		for _, h := range hashes {
			rt, rr, rp, ra = append(rt, rk.tenant), append(rr, h), append(rp, rk.purpose), append(ra, rk.recipient)
		}
	}
	var it, ii, ia []string
	for c, rows := range keys.clients {
		for _, h := range rows.hashes {
			it, ii, ia = append(it, c.tenant), append(ii, h), append(ia, c.ip)
		}
	}
	b := &pgx.Batch{}
	// First, before any row lock, a shared lock on each recipient hash: an erasure takes
	// it exclusively, so it either comes before this batch (which then sees it) or after
	// (and erases what the batch wrote).
	platform.QueueErasureLocksShared(b, Schema, rt, rr)
	// Then one lock per request (tenant, request id), in one order, before any row lock:
	// two batches that hold the same request (a redelivery while the first handling
	// runs, two durables of the issuer during a takeover, platform.Provision) decide it
	// one after the other, the second finding the first's challenge, where both would
	// find none and the second be refused by the rate limit the first just stamped.
	b.Queue(`SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT DISTINCT hashtextextended('otpflow/issuer/request/' || t || '/' || r, 0) AS k
		FROM unnest($1::text[], $2::text[]) AS u(t, r) ORDER BY 1) l`, tenants, requestIDs)
	b.Queue(`SELECT u.tenant, u.active, u.purpose, max(e.erased_at) FROM issuer.erasures e
		JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(tenant, h, purpose, active)
			ON e.tenant = u.tenant AND e.recipient_key = u.h
		GROUP BY u.tenant, u.active, u.purpose`, rt, rr, rp, ra).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var rk rcptKey
			var at time.Time
			if err := rows.Scan(&rk.tenant, &rk.recipient, &rk.purpose, &at); err != nil {
				return err
			}
			bs.erased[rk] = at
		}
		return rows.Err()
	})
	// An entry found under an older key of the ring is copied under the active one, so
	// that it outlives the old key: once the ring drops that key, nothing would find it.
	b.Queue(`INSERT INTO issuer.suppressions (tenant, recipient_key, reason, challenge_id, source, created_at, expires_at)
		SELECT DISTINCT ON (u.tenant, u.active) u.tenant, u.active, s.reason, s.challenge_id, s.source, s.created_at, s.expires_at
		FROM issuer.suppressions s
		JOIN unnest($1::text[], $2::text[], $3::text[]) AS u(tenant, h, active) ON s.tenant = u.tenant AND s.recipient_key = u.h
		WHERE u.h <> u.active
		ORDER BY u.tenant, u.active, s.created_at DESC
		ON CONFLICT (tenant, recipient_key) DO NOTHING`, rt, rr, ra)
	// Every entry of any hash of the recipient: the decision judges them on its clock and
	// the tenant's expiry.
	b.Queue(`SELECT u.tenant, u.active, u.purpose, s.reason, s.created_at, s.expires_at
		FROM issuer.suppressions s
		JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(tenant, h, purpose, active)
			ON s.tenant = u.tenant AND s.recipient_key = u.h`, rt, rr, rp, ra).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var rk rcptKey
			var sp suppression
			var until *time.Time
			if err := rows.Scan(&rk.tenant, &rk.recipient, &rk.purpose, &sp.reason, &sp.since, &until); err != nil {
				return err
			}
			if until != nil {
				sp.until = *until
			}
			bs.suppressed[rk] = append(bs.suppressed[rk], sp)
		}
		return rows.Err()
	})
	b.Queue(`SELECT c.tenant, c.request_id, c.challenge_id::text, c.code_count, c.last_code_at, c.status, c.recipient_key,
			c.recipient_seal_key_id, c.recipient_sealed, c.purpose
		FROM issuer.challenges c JOIN unnest($1::text[], $2::text[]) AS k(tenant, request_id) USING (tenant, request_id)
		ORDER BY c.tenant, c.request_id FOR UPDATE OF c`, tenants, requestIDs).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var k key
			var c challenge
			if err := rows.Scan(&k.tenant, &k.requestID, &c.id, &c.codeCount, &c.lastCodeAt, &c.status, &c.recipient, &c.sealKeyID, &c.sealed, &c.purpose); err != nil {
				return err
			}
			bs.challenges[k] = &c
		}
		return rows.Err()
	})
	// Read after the challenges are locked: a replica that decided one of these messages
	// on the same challenge has committed by now, and its row is seen.
	var mt, mh []string
	for k := range keys.messages {
		mt, mh = append(mt, k.tenant), append(mh, k.hash)
	}
	if len(mt) > 0 {
		b.Queue(`SELECT m.tenant, m.message_hash FROM issuer.resend_messages m
			JOIN unnest($1::text[], $2::text[]) AS k(tenant, message_hash) USING (tenant, message_hash)`, mt, mh).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var k msgKey
				if err := rows.Scan(&k.tenant, &k.hash); err != nil {
					return err
				}
				bs.handled[k] = true
			}
			return rows.Err()
		})
	}
	b.Queue(`INSERT INTO issuer.rate_log (key) SELECT k FROM unnest($1::text[]) AS k ORDER BY k ON CONFLICT DO NOTHING`, sortedLogs)
	b.Queue(`SELECT key, stamps FROM issuer.rate_log WHERE key = ANY($1) ORDER BY key FOR UPDATE`, sortedLogs).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var k string
			var stamps []time.Time
			if err := rows.Scan(&k, &stamps); err != nil {
				return err
			}
			bs.logs[logOf[k]] = window.Merge(bs.logs[logOf[k]], stamps)
		}
		return rows.Err()
	})
	b.Queue(`INSERT INTO issuer.rate_window (key, window_start, count) SELECT k, $2, 0 FROM unnest($1::text[]) AS k ORDER BY k
		ON CONFLICT DO NOTHING`, sortedWins, start)
	b.Queue(`SELECT key, window_start, count FROM issuer.rate_window WHERE key = ANY($1) ORDER BY key FOR UPDATE`, sortedWins).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var k string
			w := &rateWindow{}
			if err := rows.Scan(&k, &w.start, &w.count); err != nil {
				return err
			}
			bs.windows[k] = w
		}
		return rows.Err()
	})
	b.Queue(`SELECT c.tenant, k.active, c.purpose, c.challenge_id::text, c.request_id, c.status = 'active' AND c.expires_at > $4, c.created_at
		FROM issuer.challenges c JOIN unnest($1::text[], $2::text[], $3::text[], $6::text[]) AS k(tenant, recipient_key, purpose, active)
			USING (tenant, recipient_key, purpose)
		WHERE c.created_at > $5 OR (c.status = 'active' AND c.expires_at > $4)
		ORDER BY c.created_at`, rt, rr, rp, start, start.Add(-horizon), ra).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var rk rcptKey
			var a activeRef
			var active bool
			var created time.Time
			if err := rows.Scan(&rk.tenant, &rk.recipient, &rk.purpose, &a.id, &a.requestID, &active, &created); err != nil {
				return err
			}
			if active {
				bs.active[rk] = append(bs.active[rk], a)
			}
			if created.After(start.Add(-horizon)) {
				bs.recent[rk] = bs.recent[rk].Add(created)
			}
		}
		return rows.Err()
	})
	if len(it) > 0 {
		b.Queue(`SELECT r.tenant, k.active, r.recipient_hash, r.last_at FROM issuer.ip_recipients r
			JOIN unnest($1::text[], $2::text[], $4::text[]) AS k(tenant, ip_hash, active) USING (tenant, ip_hash)
			WHERE r.last_at > $3`, it, ii, start.Add(-horizon), ia).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var c clientKey
				var rcpt string
				var last time.Time
				if err := rows.Scan(&c.tenant, &c.ip, &rcpt, &last); err != nil {
					return err
				}
				if last.After(start.Add(-keys.clients[c].window)) {
					if bs.ipSeen[c] == nil {
						bs.ipSeen[c] = seenSet{}
					}
					bs.ipSeen[c].add(rcpt)
				}
			}
			return rows.Err()
		})
	}
	b.Queue(`SELECT clock_timestamp()`).QueryRow(func(row pgx.Row) error { return row.Scan(&bs.now) })
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return nil, fmt.Errorf("lock batch state: %w", err)
	}
	bs.now = bs.now.Add(st.skew()).UTC()
	return bs, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// writeBatch queues the writes of w as a handful of set-based statements, whatever the
// batch's size: every new challenge in one INSERT, then the updates of existing
// challenges (supersessions and next codes) in the order decided, then every code in one
// INSERT (after its challenge: codes reference it), then the rate-limit rows it changed,
// as the batch state holds them now. An update may touch a challenge inserted earlier in
// the batch, never one inserted later, so the inserts going first keeps the decided order.
func (st *store) writeBatch(bs *batchState, w *writes) *pgx.Batch {
	b := &pgx.Batch{}
	var ch challengeColumns
	var codes codeColumns
	var rest []rowWrite
	for _, r := range w.rows {
		switch r := r.(type) {
		case newChallenge:
			ch.add(r)
		case codeRow:
			codes.add(r)
		default:
			rest = append(rest, r)
		}
	}
	ch.queue(b)
	for _, r := range rest {
		r.queue(b)
	}
	codes.queue(b)
	if len(w.logs) > 0 {
		// The union goes back under every hash: a replica that knows only some of the
		// keys still reads the whole state.
		var keys, stamps []string
		for _, k := range sortedKeys(w.logs) {
			text := timestampArray(bs.logs[k].Trim(bs.now.Add(-horizon)))
			for _, key := range bs.logKeys[k] {
				keys, stamps = append(keys, key), append(stamps, text)
			}
		}
		b.Queue(`UPDATE issuer.rate_log l SET stamps = u.stamps::timestamptz[] FROM unnest($1::text[], $2::text[]) AS u(key, stamps)
			WHERE l.key = u.key`, keys, stamps)
	}
	if len(w.windows) > 0 {
		keys := sortedKeys(w.windows)
		starts, counts := make([]time.Time, len(keys)), make([]int64, len(keys))
		for i, k := range keys {
			starts[i], counts[i] = bs.windows[k].start, int64(bs.windows[k].count)
		}
		b.Queue(`UPDATE issuer.rate_window w SET window_start = u.start, count = u.count
			FROM unnest($1::text[], $2::timestamptz[], $3::int8[]) AS u(key, start, count) WHERE w.key = u.key`, keys, starts, counts)
	}
	for _, c := range w.clients {
		b.Queue(`INSERT INTO issuer.ip_recipients (tenant, ip_hash, recipient_hash, last_at) VALUES ($1, $2, $3, $4)
			ON CONFLICT (tenant, ip_hash, recipient_hash) DO UPDATE SET last_at = EXCLUDED.last_at`, c.tenant, c.ipHash, c.recipientHash, bs.now)
	}
	return b
}

// challengeColumns are new challenge rows, column by column, for one INSERT.
type challengeColumns struct {
	tenant, requestID, id, sealKeyID, recipient, purpose, locale, sessionID []string
	sealed                                                                  [][]byte
	codeCount                                                               []int64
	createdAt, expiresAt                                                    []time.Time
	test                                                                    []bool
}

func (c *challengeColumns) add(r newChallenge) {
	c.tenant, c.requestID, c.id = append(c.tenant, r.tenant), append(c.requestID, r.requestID), append(c.id, r.id)
	c.sealed, c.sealKeyID, c.recipient = append(c.sealed, r.sealed), append(c.sealKeyID, r.sealKeyID), append(c.recipient, r.recipient)
	c.purpose, c.locale, c.sessionID = append(c.purpose, r.purpose), append(c.locale, r.locale), append(c.sessionID, r.sessionID)
	c.codeCount, c.createdAt, c.expiresAt = append(c.codeCount, int64(r.codeCount)), append(c.createdAt, r.createdAt), append(c.expiresAt, r.expiresAt)
	c.test = append(c.test, r.test)
}

func (c *challengeColumns) queue(b *pgx.Batch) {
	if len(c.id) == 0 {
		return
	}
	b.Queue(`INSERT INTO issuer.challenges (tenant, request_id, challenge_id, recipient_sealed, recipient_seal_key_id,
			recipient_key, purpose, locale, session_id, code_count, last_code_at, expires_at, created_at, test)
		SELECT t, r, id::uuid, sealed, sk, rk, p, l, sid, n, at, exp, at, test
		FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
			$10::int8[], $11::timestamptz[], $12::timestamptz[], $13::bool[]) AS u(t, r, id, sealed, sk, rk, p, l, sid, n, at, exp, test)`,
		c.tenant, c.requestID, c.id, c.sealed, c.sealKeyID, c.recipient, c.purpose, c.locale, c.sessionID,
		c.codeCount, c.createdAt, c.expiresAt, c.test)
}

// codeColumns are code rows, column by column, for one INSERT.
type codeColumns struct {
	challengeID, pepperID []string
	seq                   []int64
	hmac                  [][]byte
	issuedAt, expiresAt   []time.Time
}

func (c *codeColumns) add(r codeRow) {
	c.challengeID, c.seq, c.hmac = append(c.challengeID, r.challengeID), append(c.seq, int64(r.seq)), append(c.hmac, r.hmac)
	c.pepperID, c.issuedAt, c.expiresAt = append(c.pepperID, r.pepperID), append(c.issuedAt, r.issuedAt), append(c.expiresAt, r.expiresAt)
}

func (c *codeColumns) queue(b *pgx.Batch) {
	if len(c.challengeID) == 0 {
		return
	}
	b.Queue(`INSERT INTO issuer.codes (challenge_id, code_seq, code_hmac, pepper_key_id, issued_at, expires_at)
		SELECT id::uuid, seq, mac, pk, at, exp
		FROM unnest($1::text[], $2::int8[], $3::bytea[], $4::text[], $5::timestamptz[], $6::timestamptz[]) AS u(id, seq, mac, pk, at, exp)`,
		c.challengeID, c.seq, c.hmac, c.pepperID, c.issuedAt, c.expiresAt)
}

// timestampArray is ts as a PostgreSQL array literal of timestamptz, for a parameter of
// an unnest of text (arrays of arrays must be rectangular; these are not).
func timestampArray(ts []time.Time) string {
	var sb strings.Builder
	sb.WriteByte('{')
	for i, t := range ts {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteByte('"')
		sb.WriteString(t.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
		sb.WriteByte('"')
	}
	sb.WriteByte('}')
	return sb.String()
}

// purge deletes challenges whose last code expired more than retention ago, with their
// codes, and rate-limit state that no window still needs.
func (st *store) purge(ctx context.Context, retention time.Duration) (int64, error) {
	var total int64
	for _, q := range []struct {
		sql string
		age time.Duration
	}{
		{`DELETE FROM issuer.codes WHERE challenge_id IN (SELECT challenge_id FROM issuer.challenges WHERE expires_at < now() - $1::interval)`, retention},
		{`DELETE FROM issuer.challenges WHERE expires_at < now() - $1::interval`, retention},
		{`DELETE FROM issuer.rate_log WHERE coalesce(stamps[array_upper(stamps, 1)], '-infinity') < now() - $1::interval`, 24 * time.Hour},
		{`DELETE FROM issuer.rate_window WHERE window_start < now() - $1::interval`, 24 * time.Hour},
		{`DELETE FROM issuer.ip_recipients WHERE last_at < now() - $1::interval`, 24 * time.Hour},
		{`DELETE FROM issuer.erasures WHERE erased_at < now() - $1::interval`, retention},
		{`DELETE FROM issuer.resend_messages WHERE handled_at < now() - $1::interval`, retention},
		// An operator's entry that lapsed; an entry from feedback lapses by the tenant's
		// expiry as it stands when a request comes, and stays until removed or erased.
		{`DELETE FROM issuer.suppressions WHERE reason = 'operator' AND expires_at < now() - $1::interval`, 0},
		{`DELETE FROM issuer.suppression_removals WHERE removed_at < now() - $1::interval`, 30 * 24 * time.Hour},
	} {
		tag, err := st.pool.Exec(ctx, q.sql, q.age-st.skew())
		if err != nil {
			return total, err
		}
		total += tag.RowsAffected()
	}
	return total, nil
}
