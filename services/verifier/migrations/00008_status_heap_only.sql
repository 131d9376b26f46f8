-- +goose Up
-- A request's status row is written two or three times in a few seconds (issued, sent,
-- verified). An update that changes no indexed column and finds room on its row's page
-- is heap-only (HOT): PostgreSQL writes the new version beside the old and no index entry.
-- Before this migration every update wrote an entry in each of the table's four indexes,
-- because updated_at, which changes on every write, was indexed for the purge.
--
-- The purge now finds its rows by created_at, which never changes, and checks updated_at
-- on them: a row is still purged once it has not been written for OTP_RETENTION, as
-- created_at <= updated_at. Rows made before this migration have no created_at (NULL, so
-- the table is not rewritten) and are found by that. Pages are filled to half, so that
-- when a batch writes every row of a page again, each new version fits beside the old;
-- the setting applies to pages written from now on.
ALTER TABLE verifier.request_status SET (fillfactor = 50);
ALTER TABLE verifier.request_status ADD COLUMN created_at timestamptz;
ALTER TABLE verifier.request_status ALTER COLUMN created_at SET DEFAULT now();
CREATE INDEX request_status_created ON verifier.request_status (created_at);
DROP INDEX verifier.request_status_updated;
