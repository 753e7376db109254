-- Orders: the authoritative record of every checkout, guarded by the database itself.
--
-- The allowed transitions are rows (order_transition_edges), not code: the BEFORE UPDATE
-- trigger refuses any status change that is not an edge, whoever issues it (a worker,
-- the CLI, or a person at psql). The version column is bumped by the trigger on every
-- update, so a writer that read version N and updates "WHERE version = N" can never
-- overwrite a change it did not see. The audit table is filled by an AFTER trigger, so
-- no writer can forget to record a transition.
--
-- Custom SQLSTATEs (class TG, outside every standard class):
--   TG001  illegal status transition, or any change to a terminal order
--          (message names order, old and new status)
--   TG002  attempt to change an immutable column of an order
--   TG003  attempt to modify or delete audit rows
--   TG004  order inserted in a state other than the initial one

CREATE TABLE order_statuses (
    status   text PRIMARY KEY,
    terminal boolean NOT NULL
);

INSERT INTO order_statuses (status, terminal) VALUES
    ('PENDING',      false),
    ('VALIDATING',   false),
    ('CHARGING',     false),
    ('RESERVING',    false),
    ('COMPENSATING', false),
    ('CANCELLING',   false),
    ('COMPLETED',    true),
    ('FAILED',       true),
    ('CANCELLED',    true);

CREATE TABLE order_transition_edges (
    from_status text NOT NULL REFERENCES order_statuses (status),
    to_status   text NOT NULL REFERENCES order_statuses (status),
    PRIMARY KEY (from_status, to_status),
    CHECK (from_status <> to_status)
);

INSERT INTO order_transition_edges (from_status, to_status) VALUES
    -- the pipeline
    ('PENDING',      'VALIDATING'),
    ('VALIDATING',   'CHARGING'),
    ('CHARGING',     'RESERVING'),
    ('RESERVING',    'COMPLETED'),
    -- an invalid order: nothing was done, nothing to undo
    ('VALIDATING',   'FAILED'),
    -- declined, out of stock, retries exhausted: undo what was done
    ('CHARGING',     'COMPENSATING'),
    ('RESERVING',    'COMPENSATING'),
    ('COMPENSATING', 'FAILED'),
    -- cancellation from any non-terminal state; CANCELLING only ever leads to CANCELLED
    ('PENDING',      'CANCELLING'),
    ('VALIDATING',   'CANCELLING'),
    ('CHARGING',     'CANCELLING'),
    ('RESERVING',    'CANCELLING'),
    ('COMPENSATING', 'CANCELLING'),
    ('CANCELLING',   'CANCELLED');

CREATE TABLE orders (
    id                 text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    customer_id        text NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 128),
    items              jsonb NOT NULL CHECK (jsonb_typeof(items) = 'array' AND jsonb_array_length(items) > 0),
    amount_cents       bigint NOT NULL CHECK (amount_cents > 0),
    currency           char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    workflow_id        text NOT NULL UNIQUE,
    status             text NOT NULL DEFAULT 'PENDING' REFERENCES order_statuses (status),
    version            integer NOT NULL DEFAULT 1,
    -- id of the last transition applied (workflow id + step); lets a retried activity
    -- recognise that its earlier attempt already committed
    last_transition_id text,
    failure_reason     text,
    cancel_reason      text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX orders_status_idx ON orders (status) WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');

CREATE TABLE order_transitions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id      text NOT NULL REFERENCES orders (id),
    from_status   text REFERENCES order_statuses (status),   -- NULL for the creation row
    to_status     text NOT NULL REFERENCES order_statuses (status),
    from_version  integer,
    to_version    integer NOT NULL,
    transition_id text,
    actor         text NOT NULL,
    trace_id      text,
    reason        text,
    at            timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX order_transitions_order_idx ON order_transitions (order_id, id);

-- Writers describe themselves through transaction-local settings:
--   SELECT set_config('tollgate.actor', 'worker:activity', true),
--          set_config('tollgate.trace_id', '<hex>', true),
--          set_config('tollgate.reason', '...', true);
-- A writer that sets nothing (psql) is recorded as its database role.
CREATE FUNCTION tollgate_setting(name text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('tollgate.' || name, true), '')
$$;

CREATE FUNCTION orders_guard_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'PENDING' THEN
        RAISE EXCEPTION 'order % must be created PENDING, not %', NEW.id, NEW.status
            USING ERRCODE = 'TG004';
    END IF;
    NEW.version := 1;
    NEW.created_at := now();
    NEW.updated_at := NEW.created_at;
    RETURN NEW;
END
$$;

CREATE FUNCTION orders_guard_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id
       OR NEW.customer_id IS DISTINCT FROM OLD.customer_id
       OR NEW.items IS DISTINCT FROM OLD.items
       OR NEW.amount_cents IS DISTINCT FROM OLD.amount_cents
       OR NEW.currency IS DISTINCT FROM OLD.currency
       OR NEW.workflow_id IS DISTINCT FROM OLD.workflow_id
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'order %: id, customer, items, amount, currency and workflow are immutable', OLD.id
            USING ERRCODE = 'TG002';
    END IF;

    -- A terminal order is frozen: not even its notes change after the fact.
    IF (SELECT terminal FROM order_statuses WHERE status = OLD.status) THEN
        RAISE EXCEPTION 'illegal order transition % -> % for order %: % is terminal',
                OLD.status, NEW.status, OLD.id, OLD.status
            USING ERRCODE = 'TG001',
                  DETAIL = format('from_status=%s to_status=%s version=%s', OLD.status, NEW.status, OLD.version);
    END IF;

    -- Writing the same status is not a transition (it only bumps the version below).
    IF NEW.status IS DISTINCT FROM OLD.status AND NOT EXISTS (
        SELECT 1 FROM order_transition_edges e
        WHERE e.from_status = OLD.status AND e.to_status = NEW.status
    ) THEN
        RAISE EXCEPTION 'illegal order transition % -> % for order %', OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'TG001',
                  DETAIL = format('from_status=%s to_status=%s version=%s', OLD.status, NEW.status, OLD.version),
                  HINT = 'allowed transitions are listed in order_transition_edges';
    END IF;

    -- The version counts changes, whatever the writer asked for: an UPDATE that forgets
    -- to bump it still invalidates every reader's copy.
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE FUNCTION orders_audit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO order_transitions (order_id, from_status, to_status, from_version, to_version,
                                       transition_id, actor, trace_id, reason)
        VALUES (NEW.id, NULL, NEW.status, NULL, NEW.version, NEW.last_transition_id,
                coalesce(tollgate_setting('actor'), session_user), tollgate_setting('trace_id'),
                tollgate_setting('reason'));
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO order_transitions (order_id, from_status, to_status, from_version, to_version,
                                       transition_id, actor, trace_id, reason)
        VALUES (NEW.id, OLD.status, NEW.status, OLD.version, NEW.version,
                CASE WHEN NEW.last_transition_id IS DISTINCT FROM OLD.last_transition_id
                     THEN NEW.last_transition_id END,
                coalesce(tollgate_setting('actor'), session_user), tollgate_setting('trace_id'),
                tollgate_setting('reason'));
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit table % is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'TG003';
END
$$;

CREATE TRIGGER orders_guard_insert BEFORE INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_guard_insert();
CREATE TRIGGER orders_guard_update BEFORE UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_guard_update();
CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_audit();
CREATE TRIGGER order_transitions_append_only BEFORE UPDATE OR DELETE ON order_transitions
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER order_transitions_no_truncate BEFORE TRUNCATE ON order_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
