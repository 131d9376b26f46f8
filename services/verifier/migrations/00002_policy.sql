-- +goose Up
ALTER TABLE verifier.challenges
    ADD COLUMN recipient_key text        NOT NULL DEFAULT '',
    ADD COLUMN test          boolean     NOT NULL DEFAULT false,
    ADD COLUMN risk          text[]      NOT NULL DEFAULT '{}';
ALTER TABLE verifier.codes
    ADD COLUMN issued_at     timestamptz;

-- Failed verifications per recipient across challenges, within the last hour: the row
-- lock serialises verifiers, so the cap is exact.
CREATE TABLE verifier.recipient_failures (
    tenant        text          NOT NULL,
    recipient_key text          NOT NULL,
    stamps        timestamptz[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, recipient_key)
);
