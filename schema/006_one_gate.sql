-- One gate in SQL too: orders move onto the generic lifecycle_guard and lifecycle_audit
-- that messages have used since 002, and their own trigger functions go.
--
-- Same rules as before, for both tables: an insert must be in the initial state and
-- gets version 1; only the listed columns may change; a terminal row is frozen; a
-- status change must be an edge of the table's graph (SQLSTATE TG001, TG002, TG004); the
-- version is bumped on every update; every status change is appended to the audit by
-- the database, with the writer's description. Errors now name the entity in the
-- singular ("illegal order transition"), whichever table raised them.

CREATE OR REPLACE FUNCTION lifecycle_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    statuses_table text := TG_ARGV[0];
    edges_table    text := TG_ARGV[1];
    initial        text := TG_ARGV[2];
    mutable        text[] := TG_ARGV[3:];
    entity         text := regexp_replace(TG_TABLE_NAME, 's$', '');
    is_terminal    boolean;
    is_edge        boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> initial THEN
            RAISE EXCEPTION '% % must be created %, not %', entity, NEW.id, initial, NEW.status
                USING ERRCODE = 'TG004';
        END IF;
        NEW.version := 1;
        NEW.created_at := now();
        NEW.updated_at := NEW.created_at;
        RETURN NEW;
    END IF;

    IF (to_jsonb(NEW) - mutable) IS DISTINCT FROM (to_jsonb(OLD) - mutable) THEN
        RAISE EXCEPTION '% %: only % may change', entity, OLD.id, array_to_string(mutable, ', ')
            USING ERRCODE = 'TG002';
    END IF;

    -- A terminal row is frozen: not even its notes change after the fact.
    EXECUTE format('SELECT terminal FROM %I WHERE status = $1', statuses_table)
        INTO is_terminal USING OLD.status;
    IF is_terminal THEN
        RAISE EXCEPTION 'illegal % transition % -> % for %: % is terminal',
                entity, OLD.status, NEW.status, OLD.id, OLD.status
            USING ERRCODE = 'TG001',
                  DETAIL = format('from_status=%s to_status=%s version=%s', OLD.status, NEW.status, OLD.version);
    END IF;

    -- Writing the same status is not a transition: it only bumps the version (a claim).
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE from_status = $1 AND to_status = $2)', edges_table)
            INTO is_edge USING OLD.status, NEW.status;
        IF NOT is_edge THEN
            RAISE EXCEPTION 'illegal % transition % -> % for %', entity, OLD.status, NEW.status, OLD.id
                USING ERRCODE = 'TG001',
                      DETAIL = format('from_status=%s to_status=%s version=%s', OLD.status, NEW.status, OLD.version),
                      HINT = format('allowed transitions are listed in %s', edges_table);
        END IF;
    END IF;

    -- The version counts changes, whatever the writer asked for: an UPDATE that forgets
    -- to bump it still invalidates every reader's copy.
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

DROP TRIGGER orders_guard_insert ON orders;
DROP TRIGGER orders_guard_update ON orders;
DROP TRIGGER orders_audit ON orders;
DROP FUNCTION orders_guard_insert(), orders_guard_update(), orders_audit();

CREATE TRIGGER orders_guard BEFORE INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION lifecycle_guard(
        'order_statuses', 'order_transition_edges', 'PENDING',
        'status', 'version', 'last_transition_id', 'failure_reason', 'cancel_reason', 'updated_at');
CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION lifecycle_audit('order_transitions', 'order_id');

-- CREATE OR REPLACE resets what 003 set: run as the owner, with a pinned search_path
-- (see 003 for why), and nobody else may attach the function to a table.
DO $$
DECLARE
    schema_name text := (SELECT relnamespace FROM pg_class WHERE oid = 'orders'::regclass)::regnamespace::text;
BEGIN
    EXECUTE format('ALTER FUNCTION %s.lifecycle_guard() SECURITY DEFINER SET search_path = %s, pg_temp',
                   schema_name, schema_name);
END
$$;
REVOKE ALL ON FUNCTION lifecycle_guard() FROM PUBLIC;
