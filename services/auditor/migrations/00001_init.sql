-- +goose Up
-- Append-only: one row per OTP_EVENTS message, keyed by its stream sequence, so a
-- redelivered event is written once. Recipients are kept only as a keyed hash and a
-- masked form; the payload has its recipient field removed.
CREATE TABLE audit.events (
    stream_seq       bigint      PRIMARY KEY,
    subject          text        NOT NULL,
    type             text        NOT NULL,
    tenant           text        NOT NULL,
    event_id         text        NOT NULL,
    source           text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    request_id       text        NOT NULL DEFAULT '',
    challenge_id     text        NOT NULL DEFAULT '',
    recipient_hash   bytea,
    recipient_masked text        NOT NULL DEFAULT '',
    payload          jsonb       NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_request ON audit.events (tenant, request_id);
CREATE INDEX events_recipient ON audit.events (recipient_hash) WHERE recipient_hash IS NOT NULL;

-- +goose StatementBegin
CREATE FUNCTION audit.forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit.events is append-only';
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON audit.events
    FOR EACH ROW EXECUTE FUNCTION audit.forbid_change();
