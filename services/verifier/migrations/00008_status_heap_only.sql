-- +goose Up
-- A request's status row is written two or three times in a few seconds (issued, sent,
-- verified). An update that changes no indexed column and finds room on its row's page
-- is heap-only (HOT): PostgreSQL writes the new version beside the old and no index entry.
-- Before this migration and the next, every update wrote an entry in each of the table's
-- four indexes, because updated_at, which changes on every write, was indexed for the
-- purge.
--
-- The purge now finds its rows by created_at, which never changes (indexed by the next
-- migration), and checks updated_at on them: a row not written for OTP_RETENTION was
-- made before it. Rows made before this migration read '-infinity', a constant default,
-- so the table is not rewritten. Pages are filled to half, so that when a batch writes
-- every row of a page again, each new version fits beside the old; the setting applies
-- to pages written from now on. Both statements change only the catalog, under the
-- table's lock (the first takes it whole), held for moments and waited for at most 10 s:
-- then the migration fails, changes nothing, and can be run again.
SET LOCAL lock_timeout = '10s';
ALTER TABLE verifier.request_status ADD COLUMN created_at timestamptz NOT NULL DEFAULT '-infinity',
    ALTER COLUMN created_at SET DEFAULT now(),
    SET (fillfactor = 50);
