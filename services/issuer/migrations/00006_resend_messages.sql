-- +goose Up
-- A resend ("resend": true) is not recognised by its (tenant, request_id): every resend of
-- a request carries the same one. Each message that asked for a resend is kept here, by the
-- identity of the message (its Otp-Redrive-Of when an operator redrove it from OTP_DLQ,
-- else its Nats-Msg-Id, else "OTP_REQUESTS:<stream sequence>"), hashed (SHA-256, hex: an
-- app chooses its ids), in the transaction that decided it: a redelivery or a redrive of
-- the same message is a duplicate, never a second code or a resend_cooldown. The rows
-- carry the recipient's subject hash so an erasure deletes them, and are purged after
-- OTP_RETENTION.
CREATE TABLE issuer.resend_messages (
    tenant        text        NOT NULL,
    message_hash  text        NOT NULL,
    recipient_key text        NOT NULL,
    handled_at    timestamptz NOT NULL,
    PRIMARY KEY (tenant, message_hash)
);
