-- +goose Up
-- An erasure is of what was known when it was asked: a code of the person issued before it
-- and still on its way (pulled from OTP_CHALLENGES, or published by the issuer's outbox
-- after the erasure command read the stream) must not be projected afterwards. Each subject
-- hash of an erased person is kept here, with the time of the erasure, for OTP_RETENTION (a
-- keyed hash, kept on purpose); a code issued before it is dropped, not projected.
CREATE TABLE verifier.erasures (
    tenant        text        NOT NULL,
    recipient_key text        NOT NULL,
    erased_at     timestamptz NOT NULL,
    PRIMARY KEY (tenant, recipient_key)
);
