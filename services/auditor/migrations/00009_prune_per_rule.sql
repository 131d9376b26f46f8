-- +goose Up
-- Each rule's alert state is kept for twice its own window, not twice the longest window
-- of any rule: the hour of the reputation rules (bounce_rate, complaint_rate) would
-- otherwise keep every provider call of delivery_failure_ratio, stamped per mail, six
-- times as long as its five minutes need. audit.prune_alert_rules deletes the stamps and
-- per-second sums of each rule older than that rule's cutoff; audit.prune_alerts still
-- prunes the alerts raised (and whatever a rule no longer enabled left behind). Same
-- SECURITY DEFINER rules as audit.prune_alerts (00006_alert_windows.sql).
-- +goose StatementBegin
CREATE FUNCTION audit.prune_alert_rules(rules text[], cutoffs timestamptz[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
    stamps pg_catalog.int8;
BEGIN
    DELETE FROM audit.alert_stamps s
        USING ROWS FROM (pg_catalog.unnest(prune_alert_rules.rules), pg_catalog.unnest(prune_alert_rules.cutoffs)) AS u(rule, cutoff)
        WHERE s.rule = u.rule AND s.at < u.cutoff;
    GET DIAGNOSTICS stamps = ROW_COUNT;
    DELETE FROM audit.alert_buckets b
        USING ROWS FROM (pg_catalog.unnest(prune_alert_rules.rules), pg_catalog.unnest(prune_alert_rules.cutoffs)) AS u(rule, cutoff)
        WHERE b.rule = u.rule AND b.at_second < pg_catalog.date_trunc('second', u.cutoff);
    RETURN stamps; -- as audit.prune_alerts counts: the per-second sums are the stamps' shadow
END;
$$;
-- +goose StatementEnd
REVOKE ALL ON FUNCTION audit.prune_alert_rules(text[], timestamptz[]) FROM PUBLIC;
