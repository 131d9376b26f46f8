-- +goose Up
-- Hash chain: every row carries the hash of the row before it (in chain order, chain_pos)
-- and its own hash over a canonical form of the event. Personal data (the recipient's
-- keyed hash and masked form, client IP, session id) enters the chain only through
-- pii_digest = SHA-256(pii_salt || personal data), so erasing it keeps the chain verifiable.
ALTER TABLE audit.events
    ADD COLUMN chain_pos  bigint,
    ADD COLUMN prev_hash  bytea,
    ADD COLUMN row_hash   bytea,
    ADD COLUMN pii        jsonb,
    ADD COLUMN pii_salt   bytea,
    ADD COLUMN pii_digest bytea,
    ADD COLUMN erased_at  timestamptz;
CREATE UNIQUE INDEX events_chain ON audit.events (chain_pos);

CREATE TABLE audit.chain_head (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    pos  bigint  NOT NULL,
    hash bytea   NOT NULL
);
INSERT INTO audit.chain_head (pos, hash) VALUES (0, '\x0000000000000000000000000000000000000000000000000000000000000000');

-- Rows purged by age: the chain of what remains starts from the last purged row's hash.
CREATE TABLE audit.checkpoints (
    pos        bigint      PRIMARY KEY,
    hash       bytea       NOT NULL,
    purged_at  timestamptz NOT NULL DEFAULT now()
);

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION audit.forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF current_setting('otpflow.audit_purge', true) = 'on' THEN
            RETURN OLD;
        END IF;
        RAISE EXCEPTION 'audit.events is append-only';
    END IF;
    IF (OLD.stream_seq, OLD.subject, OLD.type, OLD.tenant, OLD.event_id, OLD.source, OLD.occurred_at,
        OLD.request_id, OLD.challenge_id, OLD.payload)
       IS DISTINCT FROM
       (NEW.stream_seq, NEW.subject, NEW.type, NEW.tenant, NEW.event_id, NEW.source, NEW.occurred_at,
        NEW.request_id, NEW.challenge_id, NEW.payload) THEN
        RAISE EXCEPTION 'audit.events is append-only';
    END IF;
    IF OLD.chain_pos IS NOT NULL THEN
        -- Only erasure of personal data: the chain columns stay, the personal ones go.
        IF (OLD.chain_pos, OLD.prev_hash, OLD.row_hash, OLD.pii_digest)
           IS DISTINCT FROM (NEW.chain_pos, NEW.prev_hash, NEW.row_hash, NEW.pii_digest)
           OR NEW.recipient_hash IS NOT NULL OR NEW.recipient_masked <> '' OR NEW.pii IS NOT NULL OR NEW.pii_salt IS NOT NULL THEN
            RAISE EXCEPTION 'audit.events is append-only; only personal data may be erased';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
-- +goose StatementEnd
