-- Messages: the second lifecycle, held to the same gate as orders.
--
-- The guard and audit trigger functions here are generic (they take the graph and audit
-- tables as trigger arguments), so a third lifecycle needs tables and rows, not code.
-- SQLSTATEs are the ones orders use: TG001 illegal transition, TG002 immutable column,
-- TG003 append-only audit, TG004 bad initial state.

CREATE TABLE message_statuses (
    status   text PRIMARY KEY,
    terminal boolean NOT NULL
);

INSERT INTO message_statuses (status, terminal) VALUES
    ('INITIATED',      false),
    ('STORED',         false),
    ('DISPATCHED',     false),
    ('DELIVERED',      false),
    ('FALLBACK_EMAIL', false),
    ('EMAILED',        false),
    -- READ is where a message rests; only the read-sync saga's compensation leaves it
    ('READ',           false),
    ('FAILED',         true),
    ('CANCELLED',      true);

CREATE TABLE message_transition_edges (
    from_status text NOT NULL REFERENCES message_statuses (status),
    to_status   text NOT NULL REFERENCES message_statuses (status),
    PRIMARY KEY (from_status, to_status),
    CHECK (from_status <> to_status)
);

INSERT INTO message_transition_edges (from_status, to_status) VALUES
    ('INITIATED',      'STORED'),
    ('STORED',         'DISPATCHED'),
    ('DISPATCHED',     'DELIVERED'),
    ('DELIVERED',      'READ'),
    -- no delivery confirmation before the deadline, or push failed for good
    ('DISPATCHED',     'FALLBACK_EMAIL'),
    ('FALLBACK_EMAIL', 'EMAILED'),
    ('FALLBACK_EMAIL', 'FAILED'),
    ('EMAILED',        'READ'),
    -- the read-receipt sync saga failed for good: revert the read mark
    ('READ',           'DELIVERED'),
    ('READ',           'EMAILED'),
    -- the sender recalls the message
    ('INITIATED',      'CANCELLED'),
    ('STORED',         'CANCELLED'),
    ('DISPATCHED',     'CANCELLED'),
    ('DELIVERED',      'CANCELLED'),
    ('FALLBACK_EMAIL', 'CANCELLED'),
    ('EMAILED',        'CANCELLED');

CREATE TABLE devices (
    id             text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    user_id        text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    push_token     text NOT NULL UNIQUE CHECK (length(push_token) BETWEEN 1 AND 512),
    platform       text NOT NULL CHECK (platform IN ('ios', 'android', 'web')),
    active         boolean NOT NULL DEFAULT true,
    removed_reason text,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    removed_at     timestamptz
);

CREATE INDEX devices_user_idx ON devices (user_id) WHERE active;

CREATE TABLE messages (
    id                 text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    sender_id          text NOT NULL CHECK (length(sender_id) BETWEEN 1 AND 128),
    recipient_id       text NOT NULL CHECK (length(recipient_id) BETWEEN 1 AND 128),
    recipient_email    text NOT NULL CHECK (recipient_email LIKE '%_@_%'),
    body               text NOT NULL CHECK (length(body) BETWEEN 1 AND 10000),
    deadline_ms        integer NOT NULL CHECK (deadline_ms > 0),
    workflow_id        text NOT NULL UNIQUE,
    status             text NOT NULL DEFAULT 'INITIATED' REFERENCES message_statuses (status),
    version            integer NOT NULL DEFAULT 1,
    last_transition_id text,
    failure_reason     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Per-device facts: when the push went out, when the device confirmed delivery and read.
-- Written once each (first writer wins), so a repeated signal never moves a time.
CREATE TABLE message_deliveries (
    message_id   text NOT NULL REFERENCES messages (id),
    device_id    text NOT NULL REFERENCES devices (id),
    push_id      text,
    pushed_at    timestamptz,
    delivered_at timestamptz,
    read_at      timestamptz,
    -- read receipt shown on this device (pushed by the sync saga), or the device read it
    receipt_at   timestamptz,
    PRIMARY KEY (message_id, device_id)
);

CREATE TABLE message_transitions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    text NOT NULL REFERENCES messages (id),
    from_status   text REFERENCES message_statuses (status),
    to_status     text NOT NULL REFERENCES message_statuses (status),
    from_version  integer,
    to_version    integer NOT NULL,
    transition_id text,
    actor         text NOT NULL,
    trace_id      text,
    reason        text,
    at            timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX message_transitions_message_idx ON message_transitions (message_id, id);

-- Generic guard. Arguments: statuses table, edges table, initial status, then the
-- columns a writer may change (everything else is immutable).
CREATE FUNCTION lifecycle_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    statuses_table text := TG_ARGV[0];
    edges_table    text := TG_ARGV[1];
    initial        text := TG_ARGV[2];
    mutable        text[] := TG_ARGV[3:];
    is_terminal    boolean;
    is_edge        boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> initial THEN
            RAISE EXCEPTION '% % must be created %, not %', TG_TABLE_NAME, NEW.id, initial, NEW.status
                USING ERRCODE = 'TG004';
        END IF;
        NEW.version := 1;
        NEW.created_at := now();
        NEW.updated_at := NEW.created_at;
        RETURN NEW;
    END IF;

    IF (to_jsonb(NEW) - mutable) IS DISTINCT FROM (to_jsonb(OLD) - mutable) THEN
        RAISE EXCEPTION '% %: only % may change', TG_TABLE_NAME, OLD.id, array_to_string(mutable, ', ')
            USING ERRCODE = 'TG002';
    END IF;

    EXECUTE format('SELECT terminal FROM %I WHERE status = $1', statuses_table)
        INTO is_terminal USING OLD.status;
    IF is_terminal THEN
        RAISE EXCEPTION 'illegal % transition % -> % for %: % is terminal',
                TG_TABLE_NAME, OLD.status, NEW.status, OLD.id, OLD.status
            USING ERRCODE = 'TG001';
    END IF;

    IF NEW.status IS DISTINCT FROM OLD.status THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE from_status = $1 AND to_status = $2)', edges_table)
            INTO is_edge USING OLD.status, NEW.status;
        IF NOT is_edge THEN
            RAISE EXCEPTION 'illegal % transition % -> % for %', TG_TABLE_NAME, OLD.status, NEW.status, OLD.id
                USING ERRCODE = 'TG001',
                      DETAIL = format('from_status=%s to_status=%s version=%s', OLD.status, NEW.status, OLD.version),
                      HINT = format('allowed transitions are listed in %s', edges_table);
        END IF;
    END IF;

    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- Generic audit. Arguments: audit table, the audit table's entity column.
CREATE FUNCTION lifecycle_audit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'INSERT INTO %I (%I, from_status, to_status, from_version, to_version, transition_id, actor, trace_id, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)', TG_ARGV[0], TG_ARGV[1])
    USING NEW.id,
          CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
          NEW.status,
          CASE WHEN TG_OP = 'UPDATE' THEN OLD.version END,
          NEW.version,
          CASE WHEN TG_OP = 'INSERT' OR NEW.last_transition_id IS DISTINCT FROM OLD.last_transition_id
               THEN NEW.last_transition_id END,
          coalesce(tollgate_setting('actor'), session_user),
          tollgate_setting('trace_id'),
          tollgate_setting('reason');
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_guard BEFORE INSERT OR UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION lifecycle_guard(
        'message_statuses', 'message_transition_edges', 'INITIATED',
        'status', 'version', 'last_transition_id', 'failure_reason', 'updated_at');
CREATE TRIGGER messages_audit AFTER INSERT OR UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION lifecycle_audit('message_transitions', 'message_id');
CREATE TRIGGER message_transitions_append_only BEFORE UPDATE OR DELETE ON message_transitions
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER message_transitions_no_truncate BEFORE TRUNCATE ON message_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
