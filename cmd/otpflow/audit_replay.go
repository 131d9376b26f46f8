package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/auditor"
)

func auditReplay(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("audit replay", flag.ContinueOnError)
	server, dir := serverFlags(fs)
	var (
		since  = fs.String("since", "", "first event time, RFC 3339")
		until  = fs.String("until", "", "last event time, RFC 3339")
		tenant = fs.String("tenant", "", "only this tenant")
		typ    = fs.String("type", "", "only this event type, e.g. issued or otp.issued")
		format = fs.String("format", "jsonl", "output format: jsonl")
		to     = fs.String("to", "", "rebuild an audit log in this PostgreSQL database instead of printing")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	getenv = withDevKeys(getenv, *dir)
	if *format != "jsonl" {
		return errors.New("audit replay: --format must be jsonl")
	}
	var from, end time.Time
	var err error
	if *since != "" {
		if from, err = time.Parse(time.RFC3339, *since); err != nil {
			return fmt.Errorf("audit replay: --since: %w", err)
		}
	}
	if *until != "" {
		if end, err = time.Parse(time.RFC3339, *until); err != nil {
			return fmt.Errorf("audit replay: --until: %w", err)
		}
	}
	subjectType, subjectTenant := "*", "*"
	if *typ != "" {
		subjectType = strings.TrimPrefix(*typ, "otp.")
	}
	if *tenant != "" {
		subjectTenant = *tenant
	}
	var store *pgxpool.Pool
	var key []byte
	var chain *auditor.Chain
	if *to != "" {
		if key, err = auditKey(getenv); err != nil {
			return err
		}
		if chain, err = chainKey(getenv); err != nil {
			return err
		}
		if store, err = platform.OpenPostgres(ctx, *to); err != nil {
			return err
		}
		defer store.Close()
		if err := platform.Migrate(ctx, store, auditor.Schema, auditor.Migrations(), platform.NewLogger(io.Discard, "error", "replay")); err != nil {
			return err
		}
	}

	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return err
	}
	defer nc.Close()
	st, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return fmt.Errorf("audit replay: %w", err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return err
	}
	last := info.State.LastSeq
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{"otp." + subjectType + "." + subjectTenant}}
	if !from.IsZero() {
		cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &from
	}
	cons, err := js.OrderedConsumer(ctx, events.StreamEvents, cfg)
	if err != nil {
		return err
	}
	it, err := cons.Messages()
	if err != nil {
		return err
	}
	defer it.Stop()

	enc := json.NewEncoder(stdout)
	var batch []*auditor.Row
	flush := func() error {
		if store == nil || len(batch) == 0 {
			return nil
		}
		_, err := chain.Append(ctx, store, batch)
		batch = batch[:0]
		return err
	}
	n, lastReport := 0, time.Now()
	for {
		m, err := it.Next(jetstream.NextMaxWait(2 * time.Second))
		if errors.Is(err, nats.ErrTimeout) {
			break // caught up: nothing more matches the filter
		}
		if err != nil {
			return err
		}
		md, err := m.Metadata()
		if err != nil {
			return err
		}
		if !end.IsZero() && md.Timestamp.After(end) {
			break
		}
		n++
		if store != nil {
			row, err := auditor.ToRow(key, md.Sequence.Stream, md.Timestamp, m.Subject(), m.Headers(), m.Data())
			if err != nil {
				fmt.Fprintf(stderr, "skip stream sequence %d: %v\n", md.Sequence.Stream, err)
			} else {
				batch = append(batch, &row)
			}
			if len(batch) >= 500 {
				if err := flush(); err != nil {
					return err
				}
			}
		} else {
			_, tenant, _ := events.SplitSubject(m.Subject())
			typ, _, _ := events.SplitSubject(m.Subject())
			if err := enc.Encode(map[string]any{"stream_seq": md.Sequence.Stream, "subject": m.Subject(), "type": typ,
				"tenant": tenant, "time": m.Headers().Get(events.HeaderTime), "id": m.Headers().Get(events.HeaderID),
				"data": json.RawMessage(m.Data())}); err != nil {
				return err
			}
		}
		if time.Since(lastReport) > time.Second {
			fmt.Fprintf(stderr, "replayed %d events (stream sequence %d of %d)\n", n, md.Sequence.Stream, last)
			lastReport = time.Now()
		}
		if md.Sequence.Stream >= last {
			break
		}
	}
	if err := flush(); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "replayed %d events\n", n)
	return nil
}
