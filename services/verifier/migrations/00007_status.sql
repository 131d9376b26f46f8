-- +goose Up
-- What became of each request, as otp.status.<tenant> answers it (status.go): a projection
-- of OTP_EVENTS (durable verifier-status) keyed by the app's (tenant, request_id). The
-- verifier's role gets read and write on it like on every table of the schema
-- (platform.ReadWriteGrants, applied by otpflow migrate after the migrations).
--
-- A row is the request's current challenge and code (challenge_id NULL: the request was
-- refused and no challenge made, state 'rejected' with reason and detail), its state and
-- when it was reached. 'expired' is never stored: it is the answer for an open state whose
-- expires_at has passed, on the database clock. recipient_key is the subject hash of
-- otp.issued (the issuer's active OTP_SUBJECT_KEY key), what an erasure finds the rows by.
-- last_refusal_* is the latest refused request (a resend too soon, a suppressed address)
-- beside a challenge that lives on; it never replaces the state.
CREATE TABLE verifier.request_status (
    tenant              text        NOT NULL,
    request_id          text        NOT NULL,
    challenge_id        uuid,
    recipient_key       text        NOT NULL DEFAULT '',
    code_seq            int         NOT NULL DEFAULT 0,
    state               text        NOT NULL CHECK (state IN ('pending', 'sent', 'mailbox_delivered', 'delayed',
                            'bounced', 'complained', 'failed', 'dispatch_expired', 'verified', 'locked', 'superseded', 'rejected')),
    state_at            timestamptz NOT NULL,
    detail              text        NOT NULL DEFAULT '',
    reason              text        NOT NULL DEFAULT '',
    issued_at           timestamptz,
    expires_at          timestamptz,
    last_refusal_reason text        NOT NULL DEFAULT '',
    last_refusal_detail text        NOT NULL DEFAULT '',
    last_refusal_at     timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id),
    CHECK ((challenge_id IS NULL) = (state = 'rejected'))
);
-- Feedback names a challenge, not a request; a challenge belongs to one request.
CREATE UNIQUE INDEX request_status_challenge ON verifier.request_status (challenge_id);

-- The challenges an erasure removed from request_status, so that a later event of theirs
-- (a delivery, a verification) does not bring the request back. A challenge id is a
-- random UUID and names no one; kept for OTP_RETENTION.
CREATE TABLE verifier.request_status_erased (
    challenge_id uuid        PRIMARY KEY,
    erased_at    timestamptz NOT NULL DEFAULT now()
);

-- An erasure finds a person's rows by the subject hash (Erase, and the projection's own
-- otp.erasure_requested); the purge finds the rows not written for OTP_RETENTION, and the
-- erased challenges remembered as long.
CREATE INDEX request_status_recipient ON verifier.request_status (tenant, recipient_key);
CREATE INDEX request_status_updated ON verifier.request_status (updated_at);
CREATE INDEX request_status_erased_at ON verifier.request_status_erased (erased_at);
