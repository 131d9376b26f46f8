-- +goose Up
-- A window's older part is read as per-second sums, not stamp by stamp: a rule keyed by a
-- provider or a tenant gathers one stamp per event, and summing every stamp of a 5-minute
-- window for each batch grew with the traffic (at 1,000 codes/s, 300,000 index entries per
-- batch). alert_buckets holds, per rule, key and second, the sums of the stamps of that
-- second. The auditor reads the stamps of the second its window starts in one by one (the
-- window is exact to the stamp) and the seconds after it as their sums.
--
-- The sums are kept by a trigger on alert_stamps, from the rows an INSERT actually added:
-- a stamp refused as already there (ON CONFLICT DO NOTHING, an event delivered again) adds
-- nothing, and an auditor of an earlier release that writes only stamps keeps the sums
-- right as well. The auditor's role cannot write alert_buckets itself: the trigger runs as
-- the schema's owner (same search_path rule as every SECURITY DEFINER function).
-- No stamp may be written between the backfill's snapshot and the trigger's creation (an
-- auditor of the earlier release writes stamps through a rolling upgrade): the lock holds
-- writers off until this migration commits, and they then go through the trigger.
LOCK TABLE audit.alert_stamps IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE audit.alert_buckets (
    rule      text        NOT NULL,
    key       bytea       NOT NULL,
    at_second timestamptz NOT NULL,
    n         bigint      NOT NULL,
    failed    bigint      NOT NULL,
    PRIMARY KEY (rule, key, at_second) INCLUDE (n, failed)
);
INSERT INTO audit.alert_buckets (rule, key, at_second, n, failed)
SELECT rule, key, date_trunc('second', at), sum(n), sum(failed) FROM audit.alert_stamps GROUP BY 1, 2, 3;

-- +goose StatementBegin
CREATE FUNCTION audit.bucket_alert_stamps() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
BEGIN
    INSERT INTO audit.alert_buckets AS b (rule, key, at_second, n, failed)
    SELECT s.rule, s.key, date_trunc('second', s.at), sum(s.n), sum(s.failed) FROM new_stamps s GROUP BY 1, 2, 3
    ON CONFLICT (rule, key, at_second) DO UPDATE SET n = b.n + EXCLUDED.n, failed = b.failed + EXCLUDED.failed;
    RETURN NULL;
END;
$$;
-- +goose StatementEnd
REVOKE ALL ON FUNCTION audit.bucket_alert_stamps() FROM PUBLIC;
CREATE TRIGGER alert_stamps_buckets AFTER INSERT ON audit.alert_stamps
    REFERENCING NEW TABLE AS new_stamps FOR EACH STATEMENT EXECUTE FUNCTION audit.bucket_alert_stamps();

-- Pruning takes the sums with the stamps. A second the cutoff falls in keeps its sum (the
-- cutoff is older than every window, so no window reads it again).
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION audit.prune_alerts(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    stamps pg_catalog.int8;
    raised pg_catalog.int8;
BEGIN
    DELETE FROM audit.alert_stamps s WHERE s.at < prune_alerts.cutoff;
    GET DIAGNOSTICS stamps = ROW_COUNT;
    DELETE FROM audit.alert_buckets b WHERE b.at_second < pg_catalog.date_trunc('second', prune_alerts.cutoff);
    DELETE FROM audit.alerts_raised r WHERE r.raised_at < prune_alerts.cutoff;
    GET DIAGNOSTICS raised = ROW_COUNT;
    RETURN stamps + raised;
END;
$$;
-- +goose StatementEnd
