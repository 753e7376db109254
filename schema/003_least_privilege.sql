-- Least privilege: the schema has an owner, and the application connects as someone else.
--
-- Roles
--   owner         Whoever applies the migrations (DATABASE_OWNER_URL, or DATABASE_URL when
--                 that is unset). It owns every table and function below, and is the only
--                 role that can alter them, disable their triggers or TRUNCATE/UPDATE/DELETE
--                 through to the append-only guard. It needs no superuser or CREATEROLE
--                 (see tollgate_app). Its name is not fixed: it is current_user here.
--   tollgate_app  A NOLOGIN group role holding exactly what the worker and the CLI need.
--                 Login roles get it by membership (GRANT tollgate_app TO tollgate), so
--                 credentials can be rotated by adding a new login role, not new grants.
--                 It reads and writes rows of orders, messages, devices and
--                 message_deliveries (SELECT, INSERT, UPDATE; never DELETE or TRUNCATE),
--                 reads the audit and graph tables, and owns nothing: no ALTER TABLE,
--                 DISABLE TRIGGER, DROP, CREATE, and no session_replication_role (that
--                 parameter is superuser-only). Custom settings (tollgate.actor, ...) are
--                 settable by anyone; the audit trusts them only as a description of the
--                 writer, as before.
--
-- Who creates tollgate_app: whoever provisions the database (the local stack, the compose
-- file's init script, your DBA), before this migration runs. If it is missing and the role
-- running the migration may create roles (a superuser, or CREATEROLE), it is created here
-- as NOLOGIN; otherwise this migration fails with 42501 and says what to run. We do not
-- ask the owner to hold CREATEROLE just for this: it is a powerful attribute.
--
-- Audit and graph are written by the database only. The app role has no INSERT on
-- order_transitions/message_transitions, so it cannot forge an audit row; the audit triggers
-- still write them because their functions are SECURITY DEFINER (they run as the owner).
-- The guards are SECURITY DEFINER too, so their verdict depends only on owner-controlled
-- tables. Both get a pinned search_path (the schema's own, then pg_temp, with pg_catalog
-- implicitly first): without it a session could create a TEMP table named
-- order_transition_edges, which the default search_path resolves before the real one, and
-- widen the graph for itself. EXECUTE on the trigger functions is revoked from PUBLIC, so
-- nobody but the owner can attach them (SECURITY DEFINER!) to a table of their own; a
-- trigger function needs no EXECUTE privilege to fire.
--
-- Grants are explicit, per table, and no default privileges are set: a later migration
-- that adds a table grants tollgate_app what it needs on that table, and nothing reaches
-- the application by accident. schema_migrations is the migration runner's; tollgate_app
-- may read it, so a process connected as the application can tell that the schema is up
-- to date (tollgate/migrate.py) and refuse to run against one that is not.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tollgate_app') THEN
        BEGIN
            CREATE ROLE tollgate_app NOLOGIN;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'role tollgate_app does not exist, and % may not create it', current_user
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'as an administrator run: CREATE ROLE tollgate_app NOLOGIN; '
                             'GRANT tollgate_app TO <the login role of DATABASE_URL>';
        END;
    END IF;
END
$$;

-- Trigger functions: run as the owner, with a search_path no session can redirect.
DO $$
DECLARE
    schema_oid  oid := (SELECT relnamespace FROM pg_class WHERE oid = 'orders'::regclass);
    schema_name text := schema_oid::regnamespace::text;  -- quoted when it needs to be
    fn          text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['orders_guard_insert', 'orders_guard_update', 'orders_audit',
                              'lifecycle_guard', 'lifecycle_audit'] LOOP
        EXECUTE format('ALTER FUNCTION %s.%I() SECURITY DEFINER SET search_path = %s, pg_temp',
                       schema_name, fn, schema_name);
    END LOOP;
    -- Only the schema's owner can grant on it. Before PostgreSQL 15 every role may create
    -- objects in "public"; when we cannot take that away, tests/test_privileges.py says so.
    IF pg_has_role(current_user, (SELECT nspowner FROM pg_namespace WHERE oid = schema_oid),
                   'USAGE') THEN
        EXECUTE format('REVOKE CREATE ON SCHEMA %s FROM PUBLIC', schema_name);
        EXECUTE format('GRANT USAGE ON SCHEMA %s TO tollgate_app', schema_name);
    END IF;
END
$$;

REVOKE ALL ON FUNCTION orders_guard_insert(), orders_guard_update(), orders_audit(),
    lifecycle_guard(), lifecycle_audit(), audit_append_only(), tollgate_setting(text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollgate_setting(text) TO tollgate_app;

-- Authoritative: whatever tollgate_app held on these before is replaced by the list below.
REVOKE ALL ON orders, messages, devices, message_deliveries,
    order_transitions, message_transitions,
    order_statuses, order_transition_edges, message_statuses, message_transition_edges
    FROM tollgate_app;

GRANT SELECT, INSERT, UPDATE ON orders, messages, devices, message_deliveries TO tollgate_app;
GRANT SELECT ON order_transitions, message_transitions TO tollgate_app;
GRANT SELECT ON order_statuses, order_transition_edges, message_statuses, message_transition_edges
    TO tollgate_app;
REVOKE ALL ON schema_migrations FROM tollgate_app;
GRANT SELECT ON schema_migrations TO tollgate_app;
