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
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
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
		to     = fs.String("to", "", "rebuild an audit log in this PostgreSQL database instead of printing, connected as an administrator: the audit schema and roles are made there as by otpflow migrate (OTP_DB_ROLE_PREFIX)")
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
	var subjects *keys.Subjects
	var chain *auditor.Chain
	if *to != "" {
		if key, err = auditKey(getenv); err != nil {
			return err
		}
		// Events of earlier releases carry the address and client IP: the rebuilt rows
		// hold their subject hashes instead.
		if subjects, err = subjectKey(getenv); err != nil {
			return err
		}
		if chain, err = chainKey(getenv); err != nil {
			return err
		}
		prefix, err := platform.RolePrefix(getenv)
		if err != nil {
			return err
		}
		if err := platform.MigrateAll(ctx, platform.MigrateOptions{URL: *to, Prefix: prefix}, auditor.Spec()); err != nil {
			return err
		}
		if store, err = platform.OpenPostgres(ctx, *to); err != nil {
			return err
		}
		defer store.Close()
	}

	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return err
	}
	defer nc.Close()
	// Erasures first, across the whole stream whatever the filter: a row about a person
	// erased later in the stream is rebuilt or printed without their personal data.
	erasures, lastErasure, err := readErasures(ctx, js, subjectTenant)
	if err != nil {
		return fmt.Errorf("audit replay: read erasures: %w", err)
	}
	if erasures.Len() > 0 && key == nil {
		if key, err = auditKey(getenv); err != nil {
			return fmt.Errorf("audit replay: the stream holds erasures, which take the audit and subject keys to apply: %w", err)
		}
		if subjects, err = subjectKey(getenv); err != nil {
			return fmt.Errorf("audit replay: the stream holds erasures, which take the audit and subject keys to apply: %w", err)
		}
	}
	if erasures.Len() > 0 && (subjectType != "*" || !from.IsZero()) {
		// A replay that skips events must still know which challenges were an erased
		// person's: their otp.issued rows say so.
		err := scanEvents(ctx, js, events.TypeIssued.Subject(subjectTenant), func(m *jetstream.RawStreamMsg) error {
			if m.Sequence < lastErasure {
				if row, err := auditor.ToRow(key, subjects, m.Sequence, time.Time{}, m.Subject, m.Header, m.Data); err == nil {
					erasures.Apply(&row)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("audit replay: read issued challenges: %w", err)
		}
	}
	st, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return fmt.Errorf("audit replay: %w", err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return err
	}
	last := info.State.LastSeq
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
	scan := platform.Scan{Filter: "otp." + subjectType + "." + subjectTenant, Since: from}
	_, err = platform.ScanStream(ctx, js, events.StreamEvents, scan, func(m *jetstream.RawStreamMsg) error {
		if !end.IsZero() && m.Time.After(end) {
			return platform.ErrStopScan
		}
		n++
		if store != nil {
			row, err := auditor.ToRow(key, subjects, m.Sequence, m.Time, m.Subject, m.Header, m.Data)
			if err != nil {
				fmt.Fprintf(stderr, "skip stream sequence %d: %v\n", m.Sequence, err)
			} else {
				erasures.Apply(&row)
				batch = append(batch, &row)
			}
			if len(batch) >= 500 {
				if err := flush(); err != nil {
					return err
				}
			}
		} else {
			typ, tenant, _ := events.SplitSubject(m.Subject)
			out := map[string]any{"stream_seq": m.Sequence, "subject": m.Subject, "type": typ,
				"tenant": tenant, "time": m.Header.Get(events.HeaderTime), "id": m.Header.Get(events.HeaderID),
				"data": json.RawMessage(m.Data)}
			if erasures.Len() > 0 {
				// An erased person's event is printed as the log keeps it: without them.
				if row, err := auditor.ToRow(key, subjects, m.Sequence, m.Time, m.Subject, m.Header, m.Data); err == nil && erasures.Apply(&row) {
					out["data"], out["erased"] = row.Payload, true
				}
			}
			if err := enc.Encode(out); err != nil {
				return err
			}
		}
		if time.Since(lastReport) > time.Second {
			fmt.Fprintf(stderr, "replayed %d events (stream sequence %d of %d)\n", n, m.Sequence, last)
			lastReport = time.Now()
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := flush(); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "replayed %d events\n", n)
	return nil
}

// readErasures reads every otp.erasure_requested of tenant ("*": all) on OTP_EVENTS.
func readErasures(ctx context.Context, js jetstream.JetStream, tenant string) (*auditor.Erasures, uint64, error) {
	e := auditor.NewErasures()
	var last uint64
	err := scanEvents(ctx, js, events.TypeErasureRequested.Subject(tenant), func(m *jetstream.RawStreamMsg) error {
		if e.Add(m.Sequence, m.Subject, m.Data) == nil { // a malformed request erases no one; the services dead-letter it
			last = m.Sequence
		}
		return nil
	})
	return e, last, err
}

// scanEvents calls each for every message of OTP_EVENTS on filter stored now, in order.
func scanEvents(ctx context.Context, js jetstream.JetStream, filter string, each func(*jetstream.RawStreamMsg) error) error {
	_, err := platform.ScanStream(ctx, js, events.StreamEvents, platform.Scan{Filter: filter}, each)
	return err
}
