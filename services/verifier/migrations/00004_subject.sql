-- +goose Up
-- One identity for a person: a recipient is known here only by its subject hashes under
-- OTP_SUBJECT_KEY ("id:base64url", one per key of the ring when the challenge was
-- projected), and a client only by its hash inside the verify-limit keys.
--
-- Existing rows cannot be converted in SQL: the key never reaches the database. So the
-- plaintext goes and what it served is reset: challenges projected before this keep no
-- recipient (their attempts still count; they are outside the per-recipient failure cap
-- until they expire), the failure stamps start empty, and the verify-limit counters
-- (a minute's worth) start over.
ALTER TABLE verifier.challenges
    ADD COLUMN recipient_keys text[] NOT NULL DEFAULT '{}',
    DROP COLUMN recipient_key;
DELETE FROM verifier.recipient_failures;
COMMENT ON COLUMN verifier.recipient_failures.recipient_key IS 'a subject hash (OTP_SUBJECT_KEY); each hash of a recipient holds the whole state';
DELETE FROM verifier.verify_limits;
