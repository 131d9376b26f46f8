-- +goose Up
-- The backlog alert (requests_backlog_age) the issuers raise, recorded so that they raise
-- one per oldest request and at most one a minute between them, whether they are several
-- replicas or one restarted: one row per rule, the last alert's oldest request and time,
-- claimed with an upsert that only one issuer wins (platform.BacklogWatch, store.Raise).
CREATE TABLE issuer.alerts_raised (
    rule      text        PRIMARY KEY,
    oldest    bigint      NOT NULL,
    raised_at timestamptz NOT NULL
);
