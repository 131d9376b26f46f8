-- +goose Up
-- The verifier's projection of otp.issued and otp.superseded, plus its attempt counters.
CREATE TABLE verifier.challenges (
    tenant       text        NOT NULL,
    request_id   text        NOT NULL,
    challenge_id uuid        NOT NULL UNIQUE,
    max_attempts int         NOT NULL,
    attempts     int         NOT NULL DEFAULT 0,
    status       text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'verified', 'locked', 'superseded')),
    session_id   text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id)
);

CREATE TABLE verifier.codes (
    challenge_id  uuid        NOT NULL,
    code_seq      int         NOT NULL,
    code_hmac     bytea       NOT NULL,
    pepper_key_id text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (challenge_id, code_seq)
);

CREATE TABLE verifier.outbox (
    id         bigserial   PRIMARY KEY,
    subject    text        NOT NULL,
    header     jsonb       NOT NULL,
    data       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
