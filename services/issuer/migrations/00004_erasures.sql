-- +goose Up
-- An erasure is of what was known when it was asked: a request of the person stored on
-- OTP_REQUESTS before it (already pulled, or in the batch being decided) must not make a
-- new challenge afterwards. Each subject hash of an erased person is kept here, with the
-- time of the erasure, for OTP_RETENTION (a keyed hash, kept on purpose), so the issuer
-- refuses such a request (reason erased). A request stored after the erasure is a new one.
CREATE TABLE issuer.erasures (
    tenant        text        NOT NULL,
    recipient_key text        NOT NULL,
    erased_at     timestamptz NOT NULL,
    PRIMARY KEY (tenant, recipient_key)
);
