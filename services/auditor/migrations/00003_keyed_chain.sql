-- +goose Up
-- Keyed chain: row_hash is HMAC-SHA256 under a chain key the database never holds
-- (OTP_AUDIT_CHAIN_KEY); chain_key_id names the key of the ring it was made with, so the
-- chain verifies across a rotation. A purge checkpoint carries a MAC under the same key, so
-- a checkpoint row written by anyone without the key is told from one written by a purge.
ALTER TABLE audit.events ADD COLUMN chain_key_id text;
ALTER TABLE audit.checkpoints ADD COLUMN key_id text, ADD COLUMN mac bytea;

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
        IF (OLD.chain_pos, OLD.prev_hash, OLD.row_hash, OLD.pii_digest, OLD.chain_key_id)
           IS DISTINCT FROM (NEW.chain_pos, NEW.prev_hash, NEW.row_hash, NEW.pii_digest, NEW.chain_key_id)
           OR NEW.recipient_hash IS NOT NULL OR NEW.recipient_masked <> '' OR NEW.pii IS NOT NULL OR NEW.pii_salt IS NOT NULL THEN
            RAISE EXCEPTION 'audit.events is append-only; only personal data may be erased';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
-- +goose StatementEnd
