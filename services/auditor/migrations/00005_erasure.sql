-- +goose Up
-- An erasure (otp.erasure_requested) names a person of a tenant by subject hashes and is
-- applied to the rows before it on OTP_EVENTS: the rows about the person (by recipient
-- hash, or an alert's subject hash in the PII column), and the other rows of their
-- challenges, lose their personal data; the chain columns stay. It runs as the log's
-- owner: the auditor's role may not update rows. It takes only the stream sequence of a
-- chained otp.erasure_requested row and reads the tenant and hashes from it, so the
-- auditor's role erases no one an erasure request does not name (and a request forged
-- into the table is a row audit verify reports).
-- +goose StatementBegin
CREATE FUNCTION audit.erase_subject(erasure_seq bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    req_tenant pg_catalog.text;
    hashes     pg_catalog.text[];
    n          pg_catalog.int8;
BEGIN
    SELECT e.tenant, ARRAY(SELECT pg_catalog.jsonb_array_elements_text(e.payload->'recipient_hashes'))
      INTO req_tenant, hashes
      FROM audit.events e
     WHERE e.stream_seq = erasure_seq AND e.type = 'otp.erasure_requested' AND e.chain_pos IS NOT NULL
       AND pg_catalog.jsonb_typeof(e.payload->'recipient_hashes') = 'array';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no chained erasure request at stream sequence %', erasure_seq;
    END IF;
    UPDATE audit.events SET recipient_hash = NULL, recipient_masked = '', pii = NULL, pii_salt = NULL, erased_at = pg_catalog.now()
    WHERE pii_salt IS NOT NULL AND tenant = req_tenant AND stream_seq < erasure_seq
      AND (pg_catalog.convert_from(recipient_hash, 'UTF8') = ANY (hashes)
        OR (pii->>'subject_hash') = ANY (hashes)
        OR (challenge_id <> '' AND challenge_id IN
            (SELECT e.challenge_id FROM audit.events e
             WHERE e.tenant = req_tenant AND e.stream_seq < erasure_seq AND e.challenge_id <> ''
               AND pg_catalog.convert_from(e.recipient_hash, 'UTF8') = ANY (hashes))));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;
-- +goose StatementEnd
REVOKE ALL ON FUNCTION audit.erase_subject(bigint) FROM PUBLIC;
