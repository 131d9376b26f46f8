-- +goose Up
-- One identity for a person: a recipient and a client IP are known here only by their
-- keyed hashes under OTP_SUBJECT_KEY ("id:base64url"), and the address a challenge's
-- codes go to is stored sealed under OTP_SEAL_KEY, bound to the challenge id.
--
-- Existing rows cannot be converted in SQL: the keys never reach the database. So the
-- plaintext goes and what it served is reset:
-- * challenges keep their rows without an address: a repeat of their request_id is a
--   duplicate, a resend is refused (challenge_closed), a new request for the same person
--   does not supersede them (they expire within the tenant's maximum TTL);
-- * per-recipient and per-IP rate-limit state and the ip fanout sets start empty (the
--   per-tenant windows are kept).
ALTER TABLE issuer.challenges
    ADD COLUMN recipient_sealed      bytea,
    ADD COLUMN recipient_seal_key_id text NOT NULL DEFAULT '',
    DROP COLUMN recipient,
    DROP COLUMN client_ip;
UPDATE issuer.challenges SET recipient_key = '';
COMMENT ON COLUMN issuer.challenges.recipient_key IS 'subject hash of the canonical recipient (OTP_SUBJECT_KEY); empty before the upgrade';

DELETE FROM issuer.rate_log WHERE key LIKE 'rcpt|%' OR key LIKE 'ip|%';

DROP TABLE issuer.ip_recipients;
CREATE TABLE issuer.ip_recipients (
    tenant         text        NOT NULL,
    ip_hash        text        NOT NULL,
    recipient_hash text        NOT NULL,
    last_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant, ip_hash, recipient_hash)
);
