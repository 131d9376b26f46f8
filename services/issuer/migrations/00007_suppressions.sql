-- +goose Up
-- The suppression list: a tenant's recipients whose mail bounced for good or who reported
-- it as spam (otp.feedback), or whom an operator listed (otpflow suppression add). A
-- request for one is refused with reason suppressed while its entry lasts (expires_at,
-- NULL for ever). Recipients are keyed by subject hash, as everywhere; an erasure deletes
-- the person's entries. challenge_id and source say what listed them: the otp.feedback
-- message id or the operator action's.
CREATE TABLE issuer.suppressions (
    tenant        text        NOT NULL,
    recipient_key text        NOT NULL,
    reason        text        NOT NULL CHECK (reason IN ('bounced', 'complained', 'operator')),
    challenge_id  uuid,
    source        text        NOT NULL,
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz,
    PRIMARY KEY (tenant, recipient_key)
);
CREATE INDEX suppressions_expires_at ON issuer.suppressions (expires_at) WHERE expires_at IS NOT NULL;

