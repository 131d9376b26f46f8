package verifier

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// statusKey names a request's row.
type statusKey struct{ tenant, requestID string }

func compareStatusKeys(a, b statusKey) int {
	return cmp.Or(strings.Compare(a.tenant, b.tenant), strings.Compare(a.requestID, b.requestID))
}

const statusColumns = `tenant, request_id, coalesce(challenge_id::text, ''), recipient_key, code_seq, state, state_at, detail,
	reason, issued_at, expires_at, last_refusal_reason, last_refusal_detail, last_refusal_at`

func scanStatusRow(row pgx.Row, extra ...any) (*statusRow, error) {
	r := &statusRow{}
	var issued, expires, refused *time.Time
	dest := append([]any{&r.tenant, &r.requestID, &r.challengeID, &r.recipientKey, &r.codeSeq, &r.state, &r.stateAt, &r.detail,
		&r.reason, &issued, &expires, &r.refusalReason, &r.refusalDetail, &refused}, extra...)
	if err := row.Scan(dest...); err != nil {
		return nil, err
	}
	r.stateAt = r.stateAt.UTC()
	for _, t := range []struct {
		from *time.Time
		to   *time.Time
	}{{issued, &r.issuedAt}, {expires, &r.expiresAt}, {refused, &r.refusalAt}} {
		if t.from != nil {
			*t.to = t.from.UTC()
		}
	}
	return r, nil
}

// nullTime is t for a nullable column: NULL when zero.
func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

func nullUUID(id string) *string {
	if id == "" {
		return nil
	}
	return &id
}

// errStatusRace: another transaction made a row this batch would make; the batch runs
// again on what it committed.
var errStatusRace = errors.New("a request's status row was made meanwhile")

// projectStatus applies a batch of checked status events, in their order, in one
// transaction: it locks the rows they name (by request, by challenge, and an erased
// person's by subject hash) in one order, (tenant, request_id) bytewise, applies the
// rules to them in memory and writes what changed. Two replicas making the same new row
// at once: the later batch runs again (as on a deadlock or a serialization failure), up
// to three times. An event the rules refuse gets its refused set and writes nothing.
// Rows are never made from events older than retention: the durable's first start reads
// the stream's whole history, of which only what the purge would keep is written.
func (st *store) projectStatus(ctx context.Context, items []*statusEvent, retention time.Duration) error {
	for attempt := 1; ; attempt++ {
		err := pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error { return projectStatusInTx(ctx, tx, items, retention) })
		var pgErr *pgconn.PgError
		retry := errors.Is(err, errStatusRace) || (errors.As(err, &pgErr) && (pgErr.Code == "40P01" || pgErr.Code == "40001"))
		if err == nil || !retry || attempt == 3 {
			return err
		}
	}
}

func projectStatusInTx(ctx context.Context, tx pgx.Tx, items []*statusEvent, retention time.Duration) error {
	var (
		kt, kr     []string // the requests named
		ids        []string // the challenges named
		et, eh     []string // the erased persons' hashes
		it, ih     []string // the issued codes' recipients
		hasErasure bool
	)
	for _, e := range items {
		e.refused, e.orphan = nil, false
		switch {
		case e.skip:
			continue
		case e.kind == statusErasure:
			hasErasure = true
			for _, h := range e.hashes {
				et, eh = append(et, e.tenant), append(eh, h)
			}
			continue
		}
		if e.requestID != "" {
			kt, kr = append(kt, e.tenant), append(kr, e.requestID)
		}
		if e.challengeID != "" {
			ids = append(ids, e.challengeID)
		}
		if e.kind == statusIssued && e.recipientKey != "" {
			it, ih = append(it, e.tenant), append(ih, e.recipientKey)
		}
	}

	// Reads, in one round trip: the erasure locks (shared) of the issued recipients, so
	// an erasure's record (verifier.erasures) is read whole; the clock; the rows, locked;
	// the challenges erased; the erasures of the issued recipients.
	b := &pgx.Batch{}
	if len(ih) > 0 {
		platform.QueueErasureLocksShared(b, Schema, it, ih)
	}
	var now time.Time
	b.Queue(`SELECT now()`).QueryRow(func(row pgx.Row) error { return row.Scan(&now) })
	// The keys first, in lock order; then each row by its primary key, locked, one after
	// the other. A join of the keys with the table would be planned as a scan of the
	// whole table whenever its statistics lag its growth (a table that doubles in a
	// minute), once per batch; a lookup by primary key per key never is.
	rowsSQL := `SELECT x.* FROM (
			SELECT t, r FROM (
				SELECT t, r FROM unnest($1::text[], $2::text[]) AS u(t, r)
				UNION ALL SELECT c.tenant, c.request_id FROM verifier.request_status c WHERE c.challenge_id = ANY ($3::uuid[])`
	args := []any{kt, kr, ids}
	if hasErasure {
		// Only with an erasure in the batch (index request_status_recipient).
		rowsSQL += `
				UNION ALL SELECT p.tenant, p.request_id FROM verifier.request_status p
					JOIN unnest($4::text[], $5::text[]) AS x(t, k) ON p.tenant = x.t AND p.recipient_key = x.k`
		args = append(args, et, eh)
	}
	rowsSQL += `) k0
			GROUP BY t, r ORDER BY t COLLATE "C", r COLLATE "C") k
		CROSS JOIN LATERAL (SELECT ` + statusColumns + ` FROM verifier.request_status s
			WHERE s.tenant = k.t AND s.request_id = k.r FOR UPDATE) x`
	loaded := map[statusKey]*statusRow{}
	b.Queue(rowsSQL, args...).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			r, err := scanStatusRow(rows)
			if err != nil {
				return err
			}
			loaded[statusKey{r.tenant, r.requestID}] = r
		}
		return rows.Err()
	})
	tombstones := map[string]bool{}
	if len(ids) > 0 {
		b.Queue(`SELECT challenge_id::text FROM verifier.request_status_erased WHERE challenge_id = ANY ($1::uuid[])`, ids).
			Query(func(rows pgx.Rows) error {
				for rows.Next() {
					var id string
					if err := rows.Scan(&id); err != nil {
						return err
					}
					tombstones[id] = true
				}
				return rows.Err()
			})
	}
	erasedAt := map[failureRef]time.Time{} // (tenant, subject hash) → when erased
	if len(ih) > 0 {
		b.Queue(`SELECT x.tenant, x.recipient_key, x.erased_at FROM verifier.erasures x
			WHERE (x.tenant, x.recipient_key) IN (SELECT t, k FROM unnest($1::text[], $2::text[]) AS u(t, k))`, it, ih).
			Query(func(rows pgx.Rows) error {
				for rows.Next() {
					var k failureRef
					var at time.Time
					if err := rows.Scan(&k.tenant, &k.key, &at); err != nil {
						return err
					}
					erasedAt[k] = at
				}
				return rows.Err()
			})
	}
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return err
	}

	p := newStatusApply(loaded, tombstones, now.Add(-retention))
	for _, e := range items {
		if e.kind == statusIssued && e.recipientKey != "" {
			if at, ok := erasedAt[failureRef{e.tenant, e.recipientKey}]; ok && !at.Before(e.at) {
				// The person was erased after this code was issued (the erasure came
				// first to this replica): the code's request is dropped, not projected.
				p.eraseChallenge(e.challengeID)
				continue
			}
		}
		p.apply(e)
	}
	return p.write(ctx, tx)
}

// statusApply is a batch's rows in memory while its events are applied.
type statusApply struct {
	loaded map[statusKey]*statusRow
	// rows are the rows as the events left them so far (nil: deleted).
	rows map[statusKey]*statusRow
	// owner is the request holding each challenge, of every tenant: a challenge id
	// belongs to one request.
	owner map[string]statusKey
	// erased are the challenges erased: erased before (read) or by this batch.
	erased map[string]bool
	newly  map[string]bool // erased by this batch, to record
	// cutoff: rows are not made from events older than this (the retention).
	cutoff time.Time
}

func newStatusApply(loaded map[statusKey]*statusRow, erased map[string]bool, cutoff time.Time) *statusApply {
	p := &statusApply{loaded: loaded, rows: map[statusKey]*statusRow{}, owner: map[string]statusKey{}, erased: erased,
		newly: map[string]bool{}, cutoff: cutoff}
	for k, r := range loaded {
		p.rows[k] = r
		if r.challengeID != "" {
			p.owner[r.challengeID] = k
		}
	}
	return p
}

// apply applies one event to the rows.
func (p *statusApply) apply(e *statusEvent) {
	switch {
	case e.skip:
		return
	case e.kind == statusErasure:
		for k, r := range p.rows {
			if r != nil && r.tenant == e.tenant && r.recipientKey != "" && slices.Contains(e.hashes, r.recipientKey) {
				p.erase(k)
			}
		}
		return
	case e.challengeID != "" && p.erased[e.challengeID]:
		return // a challenge of an erased person: its request stays forgotten
	}
	k := statusKey{e.tenant, e.requestID}
	if e.requestID == "" { // feedback: found by its challenge, in its own tenant only
		var ok bool
		if k, ok = p.owner[e.challengeID]; !ok {
			e.orphan = true
			return
		}
		if k.tenant != e.tenant {
			return
		}
	}
	cur := p.rows[k]
	next := applyStatus(cur, e)
	if next == cur {
		return
	}
	if cur == nil && next != nil && next.stateAt.Before(p.cutoff) {
		return // older than the retention: the purge would delete it
	}
	if next != nil && next.challengeID != "" {
		if o, ok := p.owner[next.challengeID]; ok && o != k {
			e.refused = errChallengeOwned
			return
		}
	}
	if cur != nil && cur.challengeID != "" && (next == nil || next.challengeID != cur.challengeID) {
		delete(p.owner, cur.challengeID)
	}
	if next != nil && next.challengeID != "" {
		p.owner[next.challengeID] = k
	}
	p.rows[k] = next
}

// erase deletes the row k and remembers its challenge as erased.
func (p *statusApply) erase(k statusKey) {
	if r := p.rows[k]; r != nil && r.challengeID != "" {
		p.erased[r.challengeID], p.newly[r.challengeID] = true, true
		delete(p.owner, r.challengeID)
	}
	p.rows[k] = nil
}

// eraseChallenge deletes the row holding challenge id, if any, and remembers it erased.
func (p *statusApply) eraseChallenge(id string) {
	if k, ok := p.owner[id]; ok {
		p.erase(k)
	}
	p.erased[id], p.newly[id] = true, true
}

// write writes what changed, in one round trip: deletions, updates, then new rows (in
// key order), then the challenges erased.
func (p *statusApply) write(ctx context.Context, tx pgx.Tx) error {
	keys := make([]statusKey, 0, len(p.rows))
	for k := range p.rows {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, compareStatusKeys)
	// Set-based: one statement per kind of change, whatever the batch's size, the rows in
	// key order (the order they were locked in).
	var delT, delR []string
	var upd, ins statusColumnsOf
	for _, k := range keys {
		l, r := p.loaded[k], p.rows[k]
		switch {
		case l != nil && r == nil:
			delT, delR = append(delT, k.tenant), append(delR, k.requestID)
		case l != nil && !l.same(r):
			upd.add(r)
		case l == nil && r != nil:
			ins.add(r)
		}
	}
	b := &pgx.Batch{}
	if len(delT) > 0 {
		b.Queue(`DELETE FROM verifier.request_status s USING unnest($1::text[], $2::text[]) AS u(t, r)
			WHERE s.tenant = u.t AND s.request_id = u.r`, delT, delR)
	}
	if upd.n() > 0 {
		b.Queue(`UPDATE verifier.request_status s SET challenge_id = u.challenge_id, recipient_key = u.recipient_key,
				code_seq = u.code_seq, state = u.state, state_at = u.state_at, detail = u.detail, reason = u.reason,
				issued_at = u.issued_at, expires_at = u.expires_at, last_refusal_reason = u.lr_reason,
				last_refusal_detail = u.lr_detail, last_refusal_at = u.lr_at, updated_at = now()
			FROM `+statusUnnest+`
			WHERE s.tenant = u.tenant AND s.request_id = u.request_id`, upd.args()...)
	}
	raced := false
	if ins.n() > 0 {
		want := ins.n()
		b.Queue(`INSERT INTO verifier.request_status (tenant, request_id, challenge_id, recipient_key, code_seq, state,
				state_at, detail, reason, issued_at, expires_at, last_refusal_reason, last_refusal_detail, last_refusal_at)
			SELECT * FROM `+statusUnnest+` ON CONFLICT DO NOTHING`, ins.args()...).
			Exec(func(tag pgconn.CommandTag) error {
				raced = tag.RowsAffected() != int64(want)
				return nil
			})
	}
	if len(p.newly) > 0 {
		ids := make([]string, 0, len(p.newly))
		for id := range p.newly {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		b.Queue(`INSERT INTO verifier.request_status_erased (challenge_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING`, ids)
	}
	if b.Len() == 0 {
		return nil
	}
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return err
	}
	if raced {
		return errStatusRace
	}
	return nil
}

// statusUnnest turns the arrays of statusColumnsOf.args into rows named as the table's.
const statusUnnest = `unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::int[], $6::text[], $7::timestamptz[],
		$8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::text[], $13::text[], $14::timestamptz[])
	AS u(tenant, request_id, challenge_id, recipient_key, code_seq, state, state_at, detail, reason, issued_at,
		expires_at, lr_reason, lr_detail, lr_at)`

// statusColumnsOf are rows to write, column by column (statusArgs' order).
type statusColumnsOf struct {
	tenant, requestID, recipientKey, state, detail, reason, lrReason, lrDetail []string
	challengeID                                                                []*string
	codeSeq                                                                    []int32
	stateAt                                                                    []time.Time
	issuedAt, expiresAt, lrAt                                                  []*time.Time
}

func (c *statusColumnsOf) n() int { return len(c.tenant) }

func (c *statusColumnsOf) add(r *statusRow) {
	c.tenant, c.requestID = append(c.tenant, r.tenant), append(c.requestID, r.requestID)
	c.challengeID, c.recipientKey = append(c.challengeID, nullUUID(r.challengeID)), append(c.recipientKey, r.recipientKey)
	c.codeSeq, c.state, c.stateAt = append(c.codeSeq, int32(r.codeSeq)), append(c.state, string(r.state)), append(c.stateAt, r.stateAt)
	c.detail, c.reason = append(c.detail, r.detail), append(c.reason, string(r.reason))
	c.issuedAt, c.expiresAt = append(c.issuedAt, nullTime(r.issuedAt)), append(c.expiresAt, nullTime(r.expiresAt))
	c.lrReason, c.lrDetail, c.lrAt = append(c.lrReason, string(r.refusalReason)), append(c.lrDetail, r.refusalDetail), append(c.lrAt, nullTime(r.refusalAt))
}

func (c *statusColumnsOf) args() []any {
	return []any{c.tenant, c.requestID, c.challengeID, c.recipientKey, c.codeSeq, c.state, c.stateAt, c.detail, c.reason,
		c.issuedAt, c.expiresAt, c.lrReason, c.lrDetail, c.lrAt}
}

// requestStatus reads a request's row and the database's clock; nil when it has none.
func (st *store) requestStatus(ctx context.Context, tenant, requestID string) (*statusRow, time.Time, error) {
	var now time.Time
	r, err := scanStatusRow(st.pool.QueryRow(ctx, `SELECT `+statusColumns+`, now() FROM verifier.request_status
		WHERE tenant = $1 AND request_id = $2`, tenant, requestID), &now)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, time.Time{}, nil
	}
	return r, now.UTC(), err
}

// clock reads the database clock.
func (st *store) clock(ctx context.Context) (time.Time, error) {
	var now time.Time
	err := st.pool.QueryRow(ctx, `SELECT now()`).Scan(&now)
	return now.UTC(), err
}

// statusPurgeBatch is the most rows one purge statement deletes: a purge after a day of
// full load, or after the purge was down, deletes millions of rows in statements that
// each hold their locks and their WAL only briefly.
const statusPurgeBatch = 5000

// purgeStatusSQL deletes up to $2 status rows not written for $1 µs, found by created_at,
// indexed and never changed, so that updates stay heap-only (migrations 00008, 00009): a
// row not written for the retention was made before it, give or take the moments
// between two transactions' clocks ('-infinity': made before created_at existed). The
// index range scan stops at the limit, and the rows it locked are deleted where they
// are (ctid): a join on the key could be planned as a scan of the whole table. A row
// written after the statement began and before its lock was taken is left for the next
// purge.
const purgeStatusSQL = `DELETE FROM verifier.request_status WHERE ctid = ANY (ARRAY(
	SELECT ctid FROM verifier.request_status
	WHERE created_at < now() - $1::bigint * interval '1 microsecond'
	  AND updated_at < now() - $1::bigint * interval '1 microsecond' LIMIT $2 FOR UPDATE SKIP LOCKED))`

// purgeStatus deletes the status rows not written for retention, and the erased
// challenges remembered as long, in statements of at most st.purgeBatch rows (default
// statusPurgeBatch, each its own transaction) until none is left. Rows the projection
// holds are left for the next purge.
func (st *store) purgeStatus(ctx context.Context, retention time.Duration) (int64, error) {
	size := st.purgeBatch
	if size < 1 {
		size = statusPurgeBatch
	}
	var total int64
	for _, sql := range []string{
		purgeStatusSQL,
		`DELETE FROM verifier.request_status_erased WHERE challenge_id IN
			(SELECT challenge_id FROM verifier.request_status_erased
			 WHERE erased_at < now() - $1::bigint * interval '1 microsecond' LIMIT $2 FOR UPDATE SKIP LOCKED)`,
	} {
		for {
			tag, err := st.pool.Exec(ctx, sql, retention.Microseconds(), size)
			if err != nil {
				return total, err
			}
			total += tag.RowsAffected()
			if tag.RowsAffected() < int64(size) {
				break
			}
		}
	}
	return total, nil
}

// Status answers otp.status for tenant's request: its row's state, expired when its code's
// lifetime is over on the database clock. A request of another tenant is not found: the
// row is read under the tenant the request came for.
func (s *Service) Status(ctx context.Context, tenant, requestID string) (events.StatusReply, error) {
	r, now, err := s.store.requestStatus(ctx, tenant, requestID)
	if err != nil || r == nil {
		return events.StatusReply{RequestID: requestID}, err
	}
	return statusAnswer(r, now), nil
}
