-- +goose Up
-- Least privilege. The auditor's role may read the log and append rows to it, nothing
-- more (its grants are in spec.go). Whatever else changes the log — moving the chain head,
-- chaining rows written before the chain, erasure, purge — runs in the functions below,
-- SECURITY DEFINER as the schema's owner, a role nobody logs in as; each checks what it is
-- asked. The trigger lets a row change or go only when the owner does it, never because
-- of a session setting (otpflow.audit_purge is gone).
--
-- Every SECURITY DEFINER function sets search_path = pg_catalog, audit, pg_temp, with
-- pg_temp named last: left out, PostgreSQL searches the caller's temporary schema FIRST for
-- table and type names, so a caller could shadow a type the function declares (CREATE DOMAIN
-- pg_temp.bytea ... CHECK (pg_temp.f(VALUE))) and have f run as the owner. The bodies
-- schema-qualify their types, tables and functions as well; otpflow migrate also takes
-- TEMPORARY on the database from PUBLIC (docs/roles.md).

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION audit.forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_user IS DISTINCT FROM
       (SELECT pg_catalog.pg_get_userbyid(c.relowner) FROM pg_catalog.pg_class c WHERE c.oid = TG_RELID) THEN
        RAISE EXCEPTION 'audit.events is append-only: rows change only through the audit functions';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    IF (OLD.stream_seq, OLD.subject, OLD.type, OLD.tenant, OLD.event_id, OLD.source, OLD.occurred_at,
        OLD.request_id, OLD.challenge_id, OLD.payload)
       IS DISTINCT FROM
       (NEW.stream_seq, NEW.subject, NEW.type, NEW.tenant, NEW.event_id, NEW.source, NEW.occurred_at,
        NEW.request_id, NEW.challenge_id, NEW.payload) THEN
        RAISE EXCEPTION 'audit.events is append-only';
    END IF;
    IF OLD.chain_pos IS NOT NULL THEN
        -- Only erasure of personal data: the chain columns stay, the personal ones go.
        IF (OLD.chain_pos, OLD.prev_hash, OLD.row_hash, OLD.pii_digest, OLD.chain_key_id)
           IS DISTINCT FROM (NEW.chain_pos, NEW.prev_hash, NEW.row_hash, NEW.pii_digest, NEW.chain_key_id)
           OR NEW.recipient_hash IS NOT NULL OR NEW.recipient_masked <> '' OR NEW.pii IS NOT NULL OR NEW.pii_salt IS NOT NULL THEN
            RAISE EXCEPTION 'audit.events is append-only; only personal data may be erased';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
-- +goose StatementEnd

-- The head, row-locked for the caller's transaction: appenders queue here.
-- +goose StatementBegin
CREATE FUNCTION audit.lock_head(OUT pos bigint, OUT hash bytea)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
    SELECT h.pos, h.hash FROM audit.chain_head h FOR UPDATE
$$;
-- +goose StatementEnd

-- Moves the head forward over rows already appended: every position after the head up to
-- new_pos holds a row, the first links to the head, the last has new_hash. It never moves
-- back.
-- +goose StatementBegin
CREATE FUNCTION audit.advance_head(new_pos bigint, new_hash bytea) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    cur_pos bigint;
    cur_hash pg_catalog.bytea;
BEGIN
    SELECT h.pos, h.hash INTO cur_pos, cur_hash FROM audit.chain_head h FOR UPDATE;
    IF new_pos IS NULL OR new_pos <= cur_pos THEN
        RAISE EXCEPTION 'the chain head only moves forward: it is at %, not %', cur_pos, new_pos;
    END IF;
    IF (SELECT pg_catalog.count(*) FROM audit.events e WHERE e.chain_pos > cur_pos AND e.chain_pos <= new_pos) <> new_pos - cur_pos
       OR NOT EXISTS (SELECT 1 FROM audit.events e WHERE e.chain_pos = cur_pos + 1 AND e.prev_hash = cur_hash)
       OR NOT EXISTS (SELECT 1 FROM audit.events e WHERE e.chain_pos = new_pos AND e.row_hash = new_hash) THEN
        RAISE EXCEPTION 'the chain head cannot move to %: the rows after the head do not end there with that hash', new_pos;
    END IF;
    UPDATE audit.chain_head SET pos = new_pos, hash = new_hash;
END;
$$;
-- +goose StatementEnd

-- Chains the rows of a log written before the chain existed, in the order given, after
-- the head, and moves the head to the last: only while no row is chained yet, and only
-- all of the unchained rows at once. The trigger keeps their content as it is.
-- +goose StatementBegin
CREATE FUNCTION audit.chain_legacy(seqs bigint[], prevs bytea[], hashes bytea[], salts bytea[], digests bytea[], key_id text)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    cur_pos bigint;
    cur_hash pg_catalog.bytea;
    n int := coalesce(pg_catalog.array_length(seqs, 1), 0);
BEGIN
    SELECT h.pos, h.hash INTO cur_pos, cur_hash FROM audit.chain_head h FOR UPDATE;
    IF EXISTS (SELECT 1 FROM audit.events e WHERE e.chain_pos IS NOT NULL) THEN
        RAISE EXCEPTION 'the log is chained already: unchained rows were inserted outside the auditor';
    END IF;
    IF n = 0 THEN
        RETURN 0;
    END IF;
    IF (SELECT pg_catalog.count(*) FROM audit.events e WHERE e.chain_pos IS NULL) <> n
       OR pg_catalog.array_length(prevs, 1) <> n OR pg_catalog.array_length(hashes, 1) <> n
       OR pg_catalog.array_length(salts, 1) <> n OR pg_catalog.array_length(digests, 1) <> n THEN
        RAISE EXCEPTION 'every unchained row must be chained at once';
    END IF;
    FOR i IN 1..n LOOP
        IF prevs[i] IS DISTINCT FROM (CASE WHEN i = 1 THEN cur_hash ELSE hashes[i - 1] END) THEN
            RAISE EXCEPTION 'row % does not link to the one before it', seqs[i];
        END IF;
        UPDATE audit.events SET chain_pos = cur_pos + i, prev_hash = prevs[i], row_hash = hashes[i], pii_salt = salts[i],
            pii_digest = digests[i], chain_key_id = key_id
        WHERE stream_seq = seqs[i] AND chain_pos IS NULL;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no unchained row at stream sequence %', seqs[i];
        END IF;
    END LOOP;
    UPDATE audit.chain_head SET pos = cur_pos + n, hash = hashes[n];
    RETURN n;
END;
$$;
-- +goose StatementEnd

-- Erases the personal data of the rows about the recipients with these keyed hashes, and
-- of the other rows of their challenges (client IP, session id); the chain columns stay.
-- +goose StatementBegin
CREATE FUNCTION audit.erase(recipient_hashes bytea[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE audit.events SET recipient_hash = NULL, recipient_masked = '', pii = NULL, pii_salt = NULL, erased_at = pg_catalog.now()
    WHERE pii_salt IS NOT NULL AND (recipient_hash = ANY (recipient_hashes) OR (challenge_id <> '' AND challenge_id IN
        (SELECT e.challenge_id FROM audit.events e WHERE e.recipient_hash = ANY (recipient_hashes))));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;
-- +goose StatementEnd

-- Purges the chain up to and including position upto, whose row must have hash, behind a
-- checkpoint that carries the caller's MAC under the chain key (the database cannot check
-- it; verify does).
-- +goose StatementBegin
CREATE FUNCTION audit.purge(upto bigint, hash bytea, key_id text, mac bytea) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM audit.events e WHERE e.chain_pos = upto AND e.row_hash = purge.hash) THEN
        RAISE EXCEPTION 'no row at chain position % with that hash', upto;
    END IF;
    INSERT INTO audit.checkpoints (pos, hash, key_id, mac) VALUES (upto, purge.hash, purge.key_id, purge.mac) ON CONFLICT DO NOTHING;
    DELETE FROM audit.events WHERE chain_pos <= upto;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;
-- +goose StatementEnd

REVOKE ALL ON FUNCTION audit.lock_head(), audit.advance_head(bigint, bytea),
    audit.chain_legacy(bigint[], bytea[], bytea[], bytea[], bytea[], text), audit.erase(bytea[]),
    audit.purge(bigint, bytea, text, bytea) FROM PUBLIC;
