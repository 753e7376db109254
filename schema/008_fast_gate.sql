-- The gate, cheap enough to stand in every transition's path. Same rules, same errors,
-- same SQLSTATEs as 002 and 006; what changes is what each write costs the server.
--
-- Measured with the gate part of `make bench` (tollgate_dev/bench/gatebench.py), same
-- machine and minute, 2 shared cores, PostgreSQL 18 with fsync on:
--                                    before (006)      after (008)
--   server time per transition       369-597 us        160-168 us   (plain copy 81-131 / 83-85)
--   8 writers through gate.transition 1,394-1,495/s    2,001-2,416/s (plain copy ~2,850-3,325)
-- Three things cost that time:
--
-- 1. CHECKs that call SQL functions (tollgate_safe_id, tollgate_printable). PostgreSQL
--    inlines such a function by parsing its body again for every statement that checks
--    the constraint: about 20 us per function per statement, in the table's own CHECKs
--    and again in the audit row's. The CHECKs below spell the same expressions out.
--    The functions stay, for the tables that are not on the hot path (007).
--
-- 2. The generic guard and audit built their statements at run time (EXECUTE format)
--    and compared whole rows as jsonb. A dynamic statement is planned on every call.
--    lifecycle_install_gate() now writes a guard and an audit function per table, with
--    the graph tables and the frozen columns written into their bodies, so PL/pgSQL
--    plans each statement once per session. A third lifecycle still needs tables, rows
--    and one call of the installer, not code. The frozen columns are read from the
--    catalog when the installer runs: a migration that adds a column to a lifecycle
--    table calls the installer again (tests/test_gate.py checks every column is frozen).
--
-- 3. Foreign keys from a status column to the statuses table. Every writer that sets a
--    row to CHARGING took a KEY SHARE lock on the one CHARGING row of order_statuses,
--    and so did its audit row twice, so concurrent writers piled shared locks on a
--    handful of rows (multixacts). The guard already makes those keys hold: a row is
--    inserted in the initial status and moves only along edges, whose ends reference
--    the statuses table; audit rows are written only by the audit trigger, from the row.
--    The audit's key to its entity stays: it is checked on a row the writer already
--    holds, and it keeps an audited row from being deleted.

-- 1. Inline CHECKs: same rules as 005, spelled out.

ALTER TABLE orders
    DROP CONSTRAINT orders_id_safe,
    DROP CONSTRAINT orders_customer_id_safe,
    DROP CONSTRAINT orders_cancel_reason_printable,
    DROP CONSTRAINT orders_failure_reason_printable,
    ADD CONSTRAINT orders_id_safe CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    ADD CONSTRAINT orders_customer_id_safe CHECK (customer_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    ADD CONSTRAINT orders_cancel_reason_printable
        CHECK (length(cancel_reason) <= 500 AND cancel_reason !~ '[[:cntrl:]]'),
    ADD CONSTRAINT orders_failure_reason_printable
        CHECK (length(failure_reason) <= 1000 AND failure_reason !~ '[[:cntrl:]]');

ALTER TABLE messages
    DROP CONSTRAINT messages_id_safe,
    DROP CONSTRAINT messages_sender_id_safe,
    DROP CONSTRAINT messages_recipient_id_safe,
    DROP CONSTRAINT messages_body_printable,
    DROP CONSTRAINT messages_failure_reason_printable,
    ADD CONSTRAINT messages_id_safe CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    ADD CONSTRAINT messages_sender_id_safe CHECK (sender_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    ADD CONSTRAINT messages_recipient_id_safe
        CHECK (recipient_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    ADD CONSTRAINT messages_body_printable
        CHECK (length(body) BETWEEN 1 AND 10000 AND replace(body, E'\n', '') !~ '[[:cntrl:]]'),
    ADD CONSTRAINT messages_failure_reason_printable
        CHECK (length(failure_reason) <= 1000 AND failure_reason !~ '[[:cntrl:]]');

ALTER TABLE order_transitions
    DROP CONSTRAINT order_transitions_reason_printable,
    DROP CONSTRAINT order_transitions_actor_printable,
    ADD CONSTRAINT order_transitions_reason_printable
        CHECK (length(reason) <= 1000 AND reason !~ '[[:cntrl:]]'),
    ADD CONSTRAINT order_transitions_actor_printable
        CHECK (length(actor) <= 300 AND actor !~ '[[:cntrl:]]');

ALTER TABLE message_transitions
    DROP CONSTRAINT message_transitions_reason_printable,
    DROP CONSTRAINT message_transitions_actor_printable,
    ADD CONSTRAINT message_transitions_reason_printable
        CHECK (length(reason) <= 1000 AND reason !~ '[[:cntrl:]]'),
    ADD CONSTRAINT message_transitions_actor_printable
        CHECK (length(actor) <= 300 AND actor !~ '[[:cntrl:]]');

-- 3. The status keys the guard already keeps.

ALTER TABLE orders DROP CONSTRAINT orders_status_fkey;
ALTER TABLE messages DROP CONSTRAINT messages_status_fkey;
ALTER TABLE order_transitions
    DROP CONSTRAINT order_transitions_from_status_fkey,
    DROP CONSTRAINT order_transitions_to_status_fkey;
ALTER TABLE message_transitions
    DROP CONSTRAINT message_transitions_from_status_fkey,
    DROP CONSTRAINT message_transitions_to_status_fkey;

-- An audit row is read by its entity, in order: the key (entity, id) serves those reads,
-- so the separate index on them goes and each audit row updates one index, not two.

ALTER TABLE order_transitions
    DROP CONSTRAINT order_transitions_pkey,
    ADD CONSTRAINT order_transitions_pkey PRIMARY KEY (order_id, id);
DROP INDEX order_transitions_order_idx;
ALTER TABLE message_transitions
    DROP CONSTRAINT message_transitions_pkey,
    ADD CONSTRAINT message_transitions_pkey PRIMARY KEY (message_id, id);
DROP INDEX message_transitions_message_idx;

-- 2. A guard and an audit function per lifecycle table.
--
-- lifecycle_install_gate(table, statuses, edges, initial status, audit table, the audit
-- table's entity column, the columns a writer may change) (re)creates <table>_guard()
-- and <table>_audit() and the triggers of the same names. The rules, as before:
--   * an insert must be in the initial status (TG004) and gets version 1;
--   * an update may change only the listed columns (TG002);
--   * a terminal row is frozen, and a status change must be an edge (TG001);
--   * every update bumps the version;
--   * every insert and status change appends an audit row with the writer's
--     description (tollgate.actor, tollgate.trace_id, tollgate.reason settings).
-- Both functions are SECURITY DEFINER (the app role cannot write the audit itself) with
-- a pinned search_path, and name every table with its schema: a session's temporary
-- table cannot stand in for the graph or the audit (tests/test_privileges.py).

CREATE FUNCTION lifecycle_install_gate(
    entity regclass, statuses regclass, edges regclass, initial text,
    audit regclass, audit_column name, mutable name[]
) RETURNS void
LANGUAGE plpgsql AS $install$
DECLARE
    rel         record;
    frozen      text[];
    unknown     name[];
    guard_fn    text;
    audit_fn    text;
    statuses_q  text := (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = statuses);
    edges_q     text := (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = edges);
    audit_q     text := (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = audit);
BEGIN
    SELECT c.relname, n.nspname INTO rel
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = entity;
    guard_fn := format('%I.%I', rel.nspname, rel.relname || '_guard');
    audit_fn := format('%I.%I', rel.nspname, rel.relname || '_audit');

    SELECT array_agg(m) INTO unknown FROM unnest(mutable) AS m
     WHERE NOT EXISTS (SELECT FROM pg_attribute
                        WHERE attrelid = entity AND attname = m AND attnum > 0 AND NOT attisdropped);
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION '% has no column(s) %', entity, unknown;
    END IF;
    SELECT array_agg(quote_ident(attname) ORDER BY attnum) INTO frozen
      FROM pg_attribute
     WHERE attrelid = entity AND attnum > 0 AND NOT attisdropped AND NOT (attname = ANY (mutable));

    EXECUTE format($guard$
        CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %2$I, pg_temp AS $body$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                IF NEW.status IS DISTINCT FROM %3$L THEN
                    RAISE EXCEPTION '%% %% must be created %%, not %%', TG_TABLE_NAME, NEW.id, %3$L, NEW.status
                        USING ERRCODE = 'TG004';
                END IF;
                NEW.version := 1;
                NEW.created_at := now();
                NEW.updated_at := NEW.created_at;
                RETURN NEW;
            END IF;

            IF ROW(NEW.%4$s) IS DISTINCT FROM ROW(OLD.%5$s) THEN
                RAISE EXCEPTION '%% %%: only %% may change', TG_TABLE_NAME, OLD.id, %6$L
                    USING ERRCODE = 'TG002';
            END IF;

            IF (SELECT terminal FROM %7$s WHERE status = OLD.status) THEN
                RAISE EXCEPTION 'illegal %% transition %% -> %% for %%: %% is terminal',
                        TG_TABLE_NAME, OLD.status, NEW.status, OLD.id, OLD.status
                    USING ERRCODE = 'TG001';
            END IF;

            IF NEW.status IS DISTINCT FROM OLD.status AND NOT EXISTS (
                SELECT FROM %8$s WHERE from_status = OLD.status AND to_status = NEW.status
            ) THEN
                RAISE EXCEPTION 'illegal %% transition %% -> %% for %%', TG_TABLE_NAME, OLD.status, NEW.status, OLD.id
                    USING ERRCODE = 'TG001',
                          DETAIL = format('from_status=%%s to_status=%%s version=%%s', OLD.status, NEW.status, OLD.version),
                          HINT = %9$L;
            END IF;

            NEW.version := OLD.version + 1;
            NEW.updated_at := now();
            RETURN NEW;
        END
        $body$ $guard$,
        guard_fn, rel.nspname, initial,
        array_to_string(frozen, ', NEW.'), array_to_string(frozen, ', OLD.'),
        array_to_string(mutable, ', '),
        statuses_q, edges_q,
        format('allowed transitions are listed in %s', (SELECT relname FROM pg_class WHERE oid = edges)));

    EXECUTE format($audit$
        CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %2$I, pg_temp AS $body$
        BEGIN
            IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
                RETURN NULL;
            END IF;
            INSERT INTO %3$s (%4$I, from_status, to_status, from_version, to_version,
                              transition_id, actor, trace_id, reason)
            VALUES (NEW.id,
                    CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
                    NEW.status,
                    CASE WHEN TG_OP = 'UPDATE' THEN OLD.version END,
                    NEW.version,
                    CASE WHEN TG_OP = 'INSERT' OR NEW.last_transition_id IS DISTINCT FROM OLD.last_transition_id
                         THEN NEW.last_transition_id END,
                    coalesce(%2$I.tollgate_setting('actor'), session_user),
                    %2$I.tollgate_setting('trace_id'),
                    %2$I.tollgate_setting('reason'));
            RETURN NULL;
        END
        $body$ $audit$,
        audit_fn, rel.nspname, audit_q, audit_column);

    EXECUTE format('REVOKE ALL ON FUNCTION %s(), %s() FROM PUBLIC', guard_fn, audit_fn);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', rel.relname || '_guard', entity);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', rel.relname || '_audit', entity);
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                   rel.relname || '_guard', entity, guard_fn);
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                   rel.relname || '_audit', entity, audit_fn);
END
$install$;

REVOKE ALL ON FUNCTION lifecycle_install_gate(regclass, regclass, regclass, text, regclass, name, name[])
    FROM PUBLIC;

SELECT lifecycle_install_gate(
    'orders', 'order_statuses', 'order_transition_edges', 'PENDING',
    'order_transitions', 'order_id',
    ARRAY['status', 'version', 'last_transition_id', 'failure_reason', 'cancel_reason', 'updated_at']);
SELECT lifecycle_install_gate(
    'messages', 'message_statuses', 'message_transition_edges', 'INITIATED',
    'message_transitions', 'message_id',
    ARRAY['status', 'version', 'last_transition_id', 'failure_reason', 'updated_at']);

-- The generic functions have no trigger left.
DROP FUNCTION lifecycle_guard(), lifecycle_audit();
