-- +goose Up
-- A purge records the highest stream sequence it cut, so that the anchored verification
-- asks the stream for what follows it, and a redrive chains nothing from before it. Rows
-- do not follow stream order strictly (several auditors interleave; a redrive chains an
-- old event late), so the lowest sequence left in the table does not say where the purge
-- stopped. Checkpoints written before this release have none: the verification then
-- falls back to the lowest sequence left, leaving out rows a redrive chained late.
ALTER TABLE audit.checkpoints ADD COLUMN purged_to_seq bigint;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION audit.purge(upto bigint, hash bytea, key_id text, mac bytea) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM audit.events e WHERE e.chain_pos = upto AND e.row_hash = purge.hash) THEN
        RAISE EXCEPTION 'no row at chain position % with that hash', upto;
    END IF;
    INSERT INTO audit.checkpoints (pos, hash, key_id, mac, purged_to_seq)
    VALUES (upto, purge.hash, purge.key_id, purge.mac, (SELECT max(e.stream_seq) FROM audit.events e WHERE e.chain_pos <= upto))
    ON CONFLICT DO NOTHING;
    DELETE FROM audit.events WHERE chain_pos <= upto;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION audit.purge(upto bigint, hash bytea, key_id text, mac bytea) RETURNS bigint
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
ALTER TABLE audit.checkpoints DROP COLUMN purged_to_seq;
