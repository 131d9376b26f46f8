-- +goose Up
-- When an operator takes a recipient off the suppression list, the time is kept here by
-- subject hash: feedback about a bounce or complaint that happened before it (a
-- notification read late, or a genuine signed one sent to the queue again within SNS's
-- 14 days) does not list them again. Rows are purged after 30 days, past the oldest
-- notification the dispatcher reads; an erasure deletes the person's.
CREATE TABLE issuer.suppression_removals (
    tenant        text        NOT NULL,
    recipient_key text        NOT NULL,
    removed_at    timestamptz NOT NULL,
    PRIMARY KEY (tenant, recipient_key)
);
