-- +goose Up
CREATE TABLE issuer.challenges (
    tenant       text        NOT NULL,
    request_id   text        NOT NULL,
    challenge_id uuid        NOT NULL UNIQUE,
    recipient    text        NOT NULL,
    purpose      text        NOT NULL,
    locale       text        NOT NULL DEFAULT '',
    session_id   text        NOT NULL DEFAULT '',
    code_count   int         NOT NULL,
    last_code_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id)
);

-- A code exists at rest only as HMAC-SHA256(pepper, challenge_id || 0 || code).
CREATE TABLE issuer.codes (
    challenge_id  uuid        NOT NULL REFERENCES issuer.challenges (challenge_id),
    code_seq      int         NOT NULL,
    code_hmac     bytea       NOT NULL,
    pepper_key_id text        NOT NULL,
    issued_at     timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (challenge_id, code_seq)
);

-- Messages committed with a challenge and not yet confirmed by JetStream. The dispatch
-- job in here carries the code sealed (AES-256-GCM) and is deleted once published.
CREATE TABLE issuer.outbox (
    id         bigserial   PRIMARY KEY,
    subject    text        NOT NULL,
    header     jsonb       NOT NULL,
    data       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
