-- +goose Up
-- Verify calls per limit key (an HMAC of the tenant, or of the tenant and the client's
-- network; never the plaintext IP) in the current and the previous minute. One upsert
-- per call keeps the count exact across verifier replicas.
CREATE TABLE verifier.verify_limits (
    key          bytea       PRIMARY KEY,
    window_start timestamptz NOT NULL,
    hits         int         NOT NULL,
    prev_hits    int         NOT NULL DEFAULT 0
);
