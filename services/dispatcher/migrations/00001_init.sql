-- +goose Up
-- One row per code to mail. A row is claimed ('sending') before the provider is called and
-- completed after, so a redelivered job whose mail went out is acknowledged without a
-- second send.
CREATE TABLE dispatcher.deliveries (
    challenge_id        uuid        NOT NULL,
    code_seq            int         NOT NULL,
    tenant              text        NOT NULL,
    request_id          text        NOT NULL,
    status              text        NOT NULL CHECK (status IN ('sending', 'sent', 'failed', 'expired')),
    attempts            int         NOT NULL,
    provider            text        NOT NULL DEFAULT '',
    provider_message_id text        NOT NULL DEFAULT '',
    last_error          text        NOT NULL DEFAULT '',
    expires_at          timestamptz NOT NULL,
    claimed_at          timestamptz NOT NULL,
    completed_at        timestamptz,
    PRIMARY KEY (challenge_id, code_seq)
);
