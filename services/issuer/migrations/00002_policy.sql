-- +goose Up
ALTER TABLE issuer.challenges
    ADD COLUMN status        text    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'superseded')),
    ADD COLUMN recipient_key text    NOT NULL DEFAULT '',
    ADD COLUMN superseded_by text    NOT NULL DEFAULT '',
    ADD COLUMN test          boolean NOT NULL DEFAULT false,
    ADD COLUMN client_ip     text    NOT NULL DEFAULT '';
UPDATE issuer.challenges SET recipient_key = lower(recipient);
CREATE INDEX challenges_recipient ON issuer.challenges (tenant, recipient_key, purpose, created_at);

-- Sliding-window rate limits: the send times of one key (a recipient and purpose, a
-- client IP) within the longest window. The row lock serialises every issuer replica.
CREATE TABLE issuer.rate_log (
    key    text          PRIMARY KEY,
    stamps timestamptz[] NOT NULL DEFAULT '{}'
);
-- Fixed-window counters (per tenant per minute).
CREATE TABLE issuer.rate_window (
    key          text        PRIMARY KEY,
    window_start timestamptz NOT NULL,
    count        int         NOT NULL
);
-- Which recipients one client IP asked codes for, for the ip_fanout risk rule.
CREATE TABLE issuer.ip_recipients (
    tenant        text        NOT NULL,
    ip            text        NOT NULL,
    recipient_key text        NOT NULL,
    last_at       timestamptz NOT NULL,
    PRIMARY KEY (tenant, ip, recipient_key)
);
