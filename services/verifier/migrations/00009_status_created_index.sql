-- +goose Up
-- The purge's index moves from updated_at to created_at (see 00008), in one transaction:
-- all or nothing, whenever the migration stops. While the index is built (seconds for a
-- million rows) the status projection's writes wait and otp.status answers; dropping the
-- old index takes the table whole at the end, for a moment. No lock is waited for longer
-- than 10 s.
SET LOCAL lock_timeout = '10s';
CREATE INDEX request_status_created ON verifier.request_status (created_at);
DROP INDEX verifier.request_status_updated;
