-- Safe input, enforced by the database whoever writes: one identifier alphabet, bounded
-- printable free text, a cap on devices per user, and the reconciler's new findings.
--
-- Identifiers. Tollgate derives ids by joining parts with ':' (order-<id>:charge,
-- message-<id>:read-sync:2, <workflow id>:v3:CHARGING). An entity id that contained ':'
-- could spell another entity's derived id: order 'foo:recovery' became workflow
-- 'order-foo:recovery', the recovery id of order 'foo'. The alphabet below has no ':'
-- (nor spaces, slashes or control characters); tollgate/ids.py holds the same pattern.
--
-- Free text. Reasons and failure notes are bounded and hold no control characters (a
-- bare CR/LF in a reason reached an email subject); a body may hold newlines only.
--
-- Devices. A user may have at most 10 active devices: every push fans out to all of them
-- and the list travels inside workflow payloads, which Temporal caps at 2 MB. The count
-- is checked under a per-user advisory lock, so two concurrent registrations cannot both
-- take the last place. SQLSTATE TG005.
--
-- Existing rows that break the new rules make this migration stop with a message naming
-- the table and how many rows; fix or remove them, then start again.

CREATE FUNCTION tollgate_safe_id(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT value ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'
$$;

-- Printable: no control character at all (one_line = true), or none but newline.
CREATE FUNCTION tollgate_printable(value text, max_length integer, newlines boolean DEFAULT false)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT value IS NULL OR (
        length(value) <= max_length
        AND CASE WHEN newlines THEN replace(value, E'\n', '') !~ '[[:cntrl:]]'
                 ELSE value !~ '[[:cntrl:]]' END)
$$;

DO $$
DECLARE
    bad bigint;
    rule record;
BEGIN
    FOR rule IN
        SELECT * FROM (VALUES
            ('orders', 'NOT tollgate_safe_id(id) OR NOT tollgate_safe_id(customer_id)'),
            ('messages', 'NOT tollgate_safe_id(id) OR NOT tollgate_safe_id(sender_id) OR NOT tollgate_safe_id(recipient_id)'),
            ('devices', 'NOT tollgate_safe_id(id) OR NOT tollgate_safe_id(user_id)')
        ) AS r(tbl, predicate)
    LOOP
        EXECUTE format('SELECT count(*) FROM %I WHERE %s', rule.tbl, rule.predicate) INTO bad;
        IF bad > 0 THEN
            RAISE EXCEPTION '% row(s) of % have an id outside the safe alphabet', bad, rule.tbl
                USING HINT = 'ids must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ (tollgate/ids.py); '
                             'finish or remove those rows, then start again';
        END IF;
    END LOOP;
END
$$;

ALTER TABLE orders
    DROP CONSTRAINT orders_id_check,
    DROP CONSTRAINT orders_customer_id_check,
    ADD CONSTRAINT orders_id_safe CHECK (tollgate_safe_id(id)),
    ADD CONSTRAINT orders_customer_id_safe CHECK (tollgate_safe_id(customer_id)),
    ADD CONSTRAINT orders_cancel_reason_printable CHECK (tollgate_printable(cancel_reason, 500)),
    ADD CONSTRAINT orders_failure_reason_printable CHECK (tollgate_printable(failure_reason, 1000)),
    ADD CONSTRAINT orders_last_transition_id_length CHECK (length(last_transition_id) <= 300);

ALTER TABLE messages
    DROP CONSTRAINT messages_id_check,
    DROP CONSTRAINT messages_sender_id_check,
    DROP CONSTRAINT messages_recipient_id_check,
    DROP CONSTRAINT messages_recipient_email_check,
    DROP CONSTRAINT messages_body_check,
    ADD CONSTRAINT messages_id_safe CHECK (tollgate_safe_id(id)),
    ADD CONSTRAINT messages_sender_id_safe CHECK (tollgate_safe_id(sender_id)),
    ADD CONSTRAINT messages_recipient_id_safe CHECK (tollgate_safe_id(recipient_id)),
    ADD CONSTRAINT messages_recipient_email_shape
        CHECK (recipient_email ~ '^[A-Za-z0-9._%+''-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+$'),
    ADD CONSTRAINT messages_body_printable
        CHECK (length(body) >= 1 AND tollgate_printable(body, 10000, newlines => true)),
    ADD CONSTRAINT messages_failure_reason_printable CHECK (tollgate_printable(failure_reason, 1000)),
    ADD CONSTRAINT messages_last_transition_id_length CHECK (length(last_transition_id) <= 300);

ALTER TABLE devices
    DROP CONSTRAINT devices_id_check,
    DROP CONSTRAINT devices_user_id_check,
    DROP CONSTRAINT devices_push_token_check,
    ADD CONSTRAINT devices_id_safe CHECK (tollgate_safe_id(id)),
    ADD CONSTRAINT devices_user_id_safe CHECK (tollgate_safe_id(user_id)),
    -- provider tokens are opaque but printable ASCII without spaces
    ADD CONSTRAINT devices_push_token_shape
        CHECK (push_token ~ '^[!-~]+$' AND length(push_token) <= 512),
    ADD CONSTRAINT devices_removed_reason_printable CHECK (tollgate_printable(removed_reason, 200));

ALTER TABLE order_transitions
    ADD CONSTRAINT order_transitions_reason_printable CHECK (tollgate_printable(reason, 1000)),
    ADD CONSTRAINT order_transitions_actor_printable CHECK (tollgate_printable(actor, 300)),
    ADD CONSTRAINT order_transitions_transition_id_length CHECK (length(transition_id) <= 300),
    ADD CONSTRAINT order_transitions_trace_id_shape CHECK (trace_id ~ '^[0-9a-f]{32}$');

ALTER TABLE message_transitions
    ADD CONSTRAINT message_transitions_reason_printable CHECK (tollgate_printable(reason, 1000)),
    ADD CONSTRAINT message_transitions_actor_printable CHECK (tollgate_printable(actor, 300)),
    ADD CONSTRAINT message_transitions_transition_id_length CHECK (length(transition_id) <= 300),
    ADD CONSTRAINT message_transitions_trace_id_shape CHECK (trace_id ~ '^[0-9a-f]{32}$');

-- The reconciler's findings: rows whose workflow Temporal does not know ('missing',
-- repaired only when an operator asks), and rows at rest whose workflow ended FAILED,
-- TERMINATED or TIMED_OUT ('failed_at_rest', reported: the row may not be what the
-- lifecycle meant).
ALTER TABLE reconciliation_findings
    DROP CONSTRAINT reconciliation_findings_finding_check,
    ADD CONSTRAINT reconciliation_findings_finding_check
        CHECK (finding IN ('orphaned', 'disagreement', 'missing', 'failed_at_rest')),
    ADD CONSTRAINT reconciliation_findings_detail_printable CHECK (tollgate_printable(detail, 1000));

CREATE FUNCTION devices_cap() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cap      constant integer := 10;
    n_active integer;
BEGIN
    IF NOT NEW.active OR (TG_OP = 'UPDATE' AND OLD.active AND OLD.user_id = NEW.user_id) THEN
        RETURN NEW;
    END IF;
    -- Serialise registrations of one user; the lock ends with the transaction.
    PERFORM pg_advisory_xact_lock(hashtextextended('tollgate.devices:' || NEW.user_id, 0));
    SELECT count(*) INTO n_active FROM devices d
     WHERE d.user_id = NEW.user_id AND d.active AND d.id <> NEW.id;
    IF n_active >= cap THEN
        RAISE EXCEPTION 'user % already has % active devices (the limit)', NEW.user_id, n_active
            USING ERRCODE = 'TG005',
                  HINT = 'remove a device (starter.py device remove ID) before adding another';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER devices_cap BEFORE INSERT OR UPDATE OF active, user_id ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_cap();

-- As in 003: trigger functions run as the owner with a pinned search_path, and nobody
-- else may attach them to a table.
DO $$
DECLARE
    schema_name text := (SELECT relnamespace FROM pg_class WHERE oid = 'devices'::regclass)::regnamespace::text;
BEGIN
    EXECUTE format('ALTER FUNCTION %s.devices_cap() SECURITY DEFINER SET search_path = %s, pg_temp',
                   schema_name, schema_name);
END
$$;
REVOKE ALL ON FUNCTION devices_cap() FROM PUBLIC;
