-- +goose Up
-- The traceparent of the otp.challenge that announced a code: the issuer's span. A verify
-- links its own span (which continues the app's trace) to it, so an operator goes from a
-- verify to the issuance and the mail. Empty for codes projected before this migration.
ALTER TABLE verifier.codes ADD COLUMN trace_parent text NOT NULL DEFAULT '';

