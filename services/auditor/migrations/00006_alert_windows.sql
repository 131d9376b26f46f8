-- +goose Up
-- Alert windows live here, not in an auditor's memory, so that a restarted auditor goes on
-- counting where the last one stopped and several auditors sharing the durable consumer
-- count one window: each writes what its batch adds in the batch's own transaction, while
-- it holds the chain head (audit.lock_head), so the writers of one database take turns and
-- each sees what the ones before it wrote. No address, IP or subject hash is kept: a
-- window is known by the SHA-256 of its key (tenant and subject hash, tenant, or provider),
-- and its rows are pruned once they are older than every window (audit.prune_alerts).

-- One row per event a rule counted (for the provider rule: its calls to one provider, and
-- how many failed), keyed by the event's stream sequence, so that an event counts once
-- however often it is delivered. The key leads with the window and its time: a window is
-- one index range, its counts read from the index alone.
CREATE TABLE audit.alert_stamps (
    rule       text        NOT NULL,
    key        bytea       NOT NULL,
    at         timestamptz NOT NULL,
    stream_seq bigint      NOT NULL,
    n          integer     NOT NULL,
    failed     integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (rule, key, at, stream_seq) INCLUDE (n, failed)
);
CREATE INDEX alert_stamps_at ON audit.alert_stamps (at);

-- One row per alert raised: at most one per rule, key and window (window_start is the
-- alert's time truncated to its rule's window, as in the alert's Nats-Msg-Id), and none
-- within a window after the last (checked by the writer holding the chain head).
CREATE TABLE audit.alerts_raised (
    rule         text        NOT NULL,
    key          bytea       NOT NULL,
    window_start timestamptz NOT NULL,
    raised_at    timestamptz NOT NULL,
    stream_seq   bigint      NOT NULL,
    PRIMARY KEY (rule, key, window_start)
);

-- A recipient's failed verifications are counted under the recipient of the challenge,
-- found in the log by challenge id: by whichever auditor wrote the otp.issued row.
CREATE INDEX events_challenge ON audit.events (tenant, challenge_id) WHERE challenge_id <> '';

-- Prunes the alert state older than cutoff. The auditor's role may insert alert state but
-- not delete it (no DELETE anywhere in audit); it prunes through this function, which runs
-- as the schema's owner and touches nothing but the two alert tables. Same search_path
-- rule as every SECURITY DEFINER function (00004_roles.sql).
-- +goose StatementBegin
CREATE FUNCTION audit.prune_alerts(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    stamps pg_catalog.int8;
    raised pg_catalog.int8;
BEGIN
    DELETE FROM audit.alert_stamps s WHERE s.at < prune_alerts.cutoff;
    GET DIAGNOSTICS stamps = ROW_COUNT;
    DELETE FROM audit.alerts_raised r WHERE r.raised_at < prune_alerts.cutoff;
    GET DIAGNOSTICS raised = ROW_COUNT;
    RETURN stamps + raised;
END;
$$;
-- +goose StatementEnd
REVOKE ALL ON FUNCTION audit.prune_alerts(timestamptz) FROM PUBLIC;
