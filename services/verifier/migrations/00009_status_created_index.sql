-- +goose NO TRANSACTION
-- +goose Up
-- The purge's index moves from updated_at to created_at (see 00008). Both are built and
-- dropped concurrently: the status projection writes and otp.status reads throughout. A
-- build that failed leaves an invalid index, dropped here first when the migration runs
-- again.
DROP INDEX CONCURRENTLY IF EXISTS verifier.request_status_created;
CREATE INDEX CONCURRENTLY request_status_created ON verifier.request_status (created_at);
DROP INDEX CONCURRENTLY IF EXISTS verifier.request_status_updated;
