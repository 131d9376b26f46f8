-- +goose Up
-- A claim is a lease: a job redelivered while another dispatcher still holds its row waits
-- instead of sending. ambiguous counts sends whose outcome the provider never confirmed
-- (at most one deliberate re-send follows); confirmed is false for a mail recorded as sent
-- on such an unconfirmed answer.
ALTER TABLE dispatcher.deliveries
    ADD COLUMN lease_until timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN ambiguous   int         NOT NULL DEFAULT 0,
    ADD COLUMN confirmed   boolean     NOT NULL DEFAULT true;
