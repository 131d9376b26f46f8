// Package outbox is a transactional outbox over PostgreSQL and JetStream: a service writes
// the messages a change must publish in the same transaction as the change, publishes them
// after the commit and deletes them once the stream has them. A crash between commit and
// publish leaves the rows, and a relay publishes them later under the same Nats-Msg-Id, so
// the stream's dedup window turns the retry into a no-op.
//
// Each service owns one table of this shape in its own schema:
//
//	CREATE TABLE <schema>.outbox (
//	    id         bigserial PRIMARY KEY,
//	    subject    text NOT NULL,
//	    header     jsonb NOT NULL,
//	    data       bytea NOT NULL,
//	    created_at timestamptz NOT NULL DEFAULT now()
//	);
package outbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/platform"
)

// Entry is a message that sits in the outbox until it is published.
type Entry struct {
	ID  int64
	Msg *nats.Msg
}

// Outbox is one service's outbox table.
type Outbox struct {
	Table string // schema-qualified, e.g. "issuer.outbox"
	Pool  *pgxpool.Pool
	JS    jetstream.JetStream
	Log   *slog.Logger
	// First, when set, takes the subjects whose entries a Publish sends, and has the
	// stream acknowledge, before it sends the others; if one of them fails, the others
	// wait for the relay, which publishes in the same way. Entries are relayed in the
	// order they were added, so what a transaction added before an entry is on its stream
	// before it, also when the relay publishes them. The issuer publishes the verifier's
	// stream first: a code's otp.challenge, and the supersessions its request makes, are
	// stored before the job that mails the code.
	First func(subject string) bool
}

// Add writes msgs in tx, in one statement, and returns their entries, to be published
// after the commit.
func (o *Outbox) Add(ctx context.Context, tx pgx.Tx, msgs ...*nats.Msg) ([]Entry, error) {
	if len(msgs) == 0 {
		return nil, nil
	}
	subjects, headers, data := make([]string, len(msgs)), make([]string, len(msgs)), make([][]byte, len(msgs))
	for i, m := range msgs {
		h, err := json.Marshal(m.Header)
		if err != nil {
			return nil, err
		}
		subjects[i], headers[i], data[i] = m.Subject, string(h), m.Data
	}
	// The rows are inserted in the order of msgs, so their ids (from the table's
	// sequence) ascend in that order, whatever other transactions draw in between.
	rows, err := tx.Query(ctx, "INSERT INTO "+o.Table+` (subject, header, data)
		SELECT s, h::jsonb, d FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY AS u(s, h, d, n) ORDER BY n
		RETURNING id`, subjects, headers, data)
	if err != nil {
		return nil, fmt.Errorf("outbox add: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("outbox add: %w", err)
	}
	if len(ids) != len(msgs) {
		return nil, fmt.Errorf("outbox add: %d rows for %d messages", len(ids), len(msgs))
	}
	slices.Sort(ids)
	entries := make([]Entry, len(msgs))
	for i, m := range msgs {
		entries[i] = Entry{ID: ids[i], Msg: m}
	}
	return entries, nil
}

// Publish publishes entries and deletes them from the table. On error the rows that
// remain are published again by a later Publish or by Relay.
func (o *Outbox) Publish(ctx context.Context, entries []Entry) error {
	if o.First != nil {
		var first, rest []Entry
		for _, e := range entries {
			if o.First(e.Msg.Subject) {
				first = append(first, e)
			} else {
				rest = append(rest, e)
			}
		}
		if len(first) > 0 && len(rest) > 0 {
			if err := platform.PublishAll(ctx, o.JS, messages(first)); err != nil {
				return err
			}
			if err := platform.PublishAll(ctx, o.JS, messages(rest)); err != nil {
				// The first ones are stored: only the rest is left to the relay (also when
				// ctx ended the publish).
				dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				defer cancel()
				return errors.Join(err, o.delete(dctx, first))
			}
			return o.delete(ctx, entries)
		}
	}
	if len(entries) == 0 {
		return nil
	}
	if err := platform.PublishAll(ctx, o.JS, messages(entries)); err != nil {
		return err
	}
	return o.delete(ctx, entries)
}

// messages are the entries' messages.
func messages(entries []Entry) []*nats.Msg {
	msgs := make([]*nats.Msg, len(entries))
	for i, e := range entries {
		msgs[i] = e.Msg
	}
	return msgs
}

// delete removes published entries from the table.
func (o *Outbox) delete(ctx context.Context, entries []Entry) error {
	ids := make([]int64, len(entries))
	for i, e := range entries {
		ids[i] = e.ID
	}
	if _, err := o.Pool.Exec(ctx, "DELETE FROM "+o.Table+" WHERE id = ANY($1)", ids); err != nil {
		return fmt.Errorf("outbox delete: %w", err)
	}
	return nil
}

// Pending reads up to limit entries older than age, oldest first.
func (o *Outbox) Pending(ctx context.Context, age time.Duration, limit int) ([]Entry, error) {
	rows, err := o.Pool.Query(ctx, "SELECT id, subject, header, data FROM "+o.Table+
		" WHERE created_at < now() - $1::interval ORDER BY id LIMIT $2", age, limit)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (Entry, error) {
		var e Entry
		var subject string
		var header []byte
		var data []byte
		if err := row.Scan(&e.ID, &subject, &header, &data); err != nil {
			return e, err
		}
		e.Msg = nats.NewMsg(subject)
		e.Msg.Data = data
		if err := json.Unmarshal(header, &e.Msg.Header); err != nil {
			return e, err
		}
		return e, nil
	})
}

// Relay publishes entries left behind by a crash: every interval, those older than age.
// It returns when ctx is cancelled.
func (o *Outbox) Relay(ctx context.Context, interval, age time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		for {
			entries, err := o.Pending(ctx, age, 500)
			if err != nil {
				if ctx.Err() == nil {
					o.Log.Warn("outbox relay: read", "table", o.Table, "err", err)
				}
				break
			}
			if len(entries) == 0 {
				break
			}
			if err := o.Publish(ctx, entries); err != nil {
				o.Log.Warn("outbox relay: publish", "table", o.Table, "err", err)
				break
			}
			o.Log.Info("outbox relay: published leftovers", "table", o.Table, "count", len(entries))
		}
	}
}
