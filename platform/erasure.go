package platform

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/prometheus/client_golang/prometheus"
)

// EraseFunc erases, in one transaction, what a service holds of the person an erasure
// names (by subject hashes under every key of the ring) and returns the number of rows it
// changed or deleted. It must be idempotent: a redelivered erasure finds nothing left.
type EraseFunc func(ctx context.Context, req events.ErasureRequested) (int64, error)

// ErasureConfig configures RunErasures.
type ErasureConfig struct {
	// Service names the service in its otp.erased answers and its durable consumer
	// (events.ErasureConsumer).
	Service string
	Streams events.StreamOptions
	Erase   EraseFunc
	// DeadLetters seal the requests that cannot be read (OTP_DLQ_KEY); required.
	DeadLetters *DeadLetters
	Log         *slog.Logger
	Reg         prometheus.Registerer
}

// RunErasures is a service's part of an erasure: it reads otp.erasure_requested from
// OTP_EVENTS with the service's own durable consumer, erases, and answers each with
// otp.erased.<tenant> naming the service before acknowledging it. A crash between the two
// redoes the erasure (finding nothing) and answers again under the same message id.
// A malformed request is dead-lettered with its reason; a failing erasure is retried.
func RunErasures(ctx context.Context, js jetstream.JetStream, cfg ErasureConfig) error {
	cons, err := Bind(ctx, js, events.StreamEvents, events.ErasureConsumer(cfg.Service))
	if err != nil {
		return SetupError(ctx, err)
	}
	c := NewConsumer(cons, ConsumeConfig{Name: cfg.Service + "-erasure", BatchSize: 1, JS: js, Log: cfg.Log, Reg: cfg.Reg,
		DeadLetters: cfg.DeadLetters})
	return c.Run(ctx, func(ctx context.Context, batch []*Delivery) error {
		for _, d := range batch {
			if err := handleErasure(ctx, js, cfg, d); err != nil {
				return err
			}
		}
		return nil
	})
}

func handleErasure(ctx context.Context, js jetstream.JetStream, cfg ErasureConfig, d *Delivery) error {
	_, tenant, _ := events.SplitSubject(d.Subject())
	req, err := DecodeErasure(d.Subject(), d.Data())
	if err != nil {
		d.Settle(DeadLetter(tenant, cfg.Service+": "+err.Error()))
		return nil
	}
	n, err := cfg.Erase(ctx, req)
	if err != nil {
		if refused, ok := RefusedByDatabase(err); ok {
			d.Settle(DeadLetter(tenant, cfg.Service+": erasure "+req.ErasureID+": "+refused.Error()))
			return nil
		}
		return fmt.Errorf("erasure %s: %w", req.ErasureID, err)
	}
	if err := PublishErased(ctx, js, cfg.Service, req, n); err != nil {
		return err
	}
	cfg.Log.Info("erased a person", "erasure_id", req.ErasureID, "tenant", req.Tenant, "rows", n)
	d.Settle(Ack())
	return nil
}

// DecodeErasure decodes and checks an otp.erasure_requested message: its tenant matches
// the subject's, its id is a UUID, and it names at least one subject hash, each of the
// form "id:base64url".
func DecodeErasure(subject string, data []byte) (events.ErasureRequested, error) {
	var req events.ErasureRequested
	_, tenant, err := events.SplitSubject(subject)
	if err != nil {
		return req, err
	}
	if err := events.DecodeEvent(data, &req); err != nil {
		return req, err
	}
	if req.Tenant != tenant {
		return req, fmt.Errorf("erasure names tenant %q on the subject of tenant %q", req.Tenant, tenant)
	}
	if !events.IsUUID(req.ErasureID) {
		return req, fmt.Errorf("erasure_id is not a UUID")
	}
	if len(req.RecipientHashes) == 0 || len(req.RecipientHashes) > 64 {
		return req, fmt.Errorf("erasure must name 1 to 64 recipient hashes, names %d", len(req.RecipientHashes))
	}
	for _, h := range req.RecipientHashes {
		if !events.IsSubjectHash(h) {
			return req, fmt.Errorf("recipient_hashes holds a value that is not a subject hash")
		}
	}
	return req, nil
}

// PublishErased publishes service's otp.erased answer to req, deduplicated per service and
// erasure.
func PublishErased(ctx context.Context, js jetstream.JetStream, service string, req events.ErasureRequested, rows int64) error {
	ev := events.Erased{ErasureID: req.ErasureID, Tenant: req.Tenant, Service: service, Rows: rows, ErasedAt: time.Now().UTC()}
	msg, err := events.NewMsg(events.TypeErased, req.Tenant, "erased:"+service+":"+req.ErasureID, "", ev,
		events.Envelope{Source: "otpflow/" + service, Time: ev.ErasedAt})
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(pctx, msg); err != nil {
		return fmt.Errorf("publish %s: %w", events.TypeErased, err)
	}
	return nil
}

// An erasure and the work in flight for the same person serialize on per-person advisory
// locks in the service's database: the work holds them shared (QueueErasureLocksShared,
// first in its transaction, before any row lock), the erasure exclusively
// (RecordErasure). So the work runs wholly before the erasure, which then erases what it
// wrote, or wholly after, and then finds the erasure in <schema>.erasures: a table of
// (tenant, recipient_key, erased_at) each service that keeps it migrates, holding the
// person's subject hashes for a while, on purpose, so that work begun before the erasure
// is refused.

// erasureLockSQL takes the erasure locks of the pairs ($1 tenants, $2 subject hashes) of
// schema with lock, pg_advisory_xact_lock or pg_advisory_xact_lock_shared, in one order.
func erasureLockSQL(schema, lock string) string {
	return `SELECT count(` + lock + `(k)) FROM (SELECT DISTINCT hashtextextended('otpflow/` + schema +
		`/erasure/' || tenant || '/' || h, 0) AS k FROM unnest($1::text[], $2::text[]) AS u(tenant, h) ORDER BY 1) l`
}

// QueueErasureLocksShared queues on b the shared erasure locks of schema for each
// (tenants[i], hashes[i]).
func QueueErasureLocksShared(b *pgx.Batch, schema string, tenants, hashes []string) {
	b.Queue(erasureLockSQL(schema, "pg_advisory_xact_lock_shared"), tenants, hashes)
}

// RecordErasure, in tx, takes the person's erasure locks of schema exclusively and
// records (or renews) each of their subject hashes in <schema>.erasures at the database's
// now.
func RecordErasure(ctx context.Context, tx pgx.Tx, schema string, req events.ErasureRequested) error {
	tenants := make([]string, len(req.RecipientHashes))
	for i := range tenants {
		tenants[i] = req.Tenant
	}
	if _, err := tx.Exec(ctx, erasureLockSQL(schema, "pg_advisory_xact_lock"), tenants, req.RecipientHashes); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, `INSERT INTO `+pgx.Identifier{schema, "erasures"}.Sanitize()+` (tenant, recipient_key, erased_at)
		SELECT $1, h, now() FROM unnest($2::text[]) AS h
		ON CONFLICT (tenant, recipient_key) DO UPDATE SET erased_at = excluded.erased_at`, req.Tenant, req.RecipientHashes)
	return err
}
