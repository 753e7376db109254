-- The HTTP API: who may call it (clients and the hashes of their keys), what each client
-- owns, the idempotency keys of its creates, and the device receipts already applied.
--
-- Ownership. orders, messages and devices get a nullable client_id: the API sets it when
-- it creates the row; rows the CLI creates keep NULL and belong to no client (no API
-- caller sees them). It is fixed at insert, for every writer, the schema owner included:
-- on orders and messages the generic lifecycle_guard (002, 006) refuses a change to any
-- column outside its mutable list, and client_id is not in it (TG002). devices has no
-- lifecycle guard, so devices_owner_fixed below holds its client_id to the same rule.
--
-- Keys. A key is "tg_<id>_<secret>". Postgres keeps the id and the SHA-256 of the
-- secret, never the secret: whoever reads this table cannot call the API. The secret is
-- 32 random bytes, so a plain hash suffices (no password stretching: nothing to guess).
-- A key is revoked by setting revoked_at, the only column the application may update.
--
-- Idempotency. A create carries an Idempotency-Key; (client, key) names one entity
-- forever, with the hash of the request that created it, so a retry with the same body
-- gets the same entity and a different body is refused. The row is written in the
-- transaction that inserts the entity and starts its workflow: all three, or none.
--
-- Receipts. Delivery and read receipts come from devices (or the push provider) over a
-- signed webhook and may be sent any number of times; a receipt id is recorded once, in
-- the transaction that applies it, so it is applied once. Receipts for devices or
-- messages Tollgate does not know are recorded too (outcome says so), and never applied.
--
-- Grants are explicit, per table, as in 003: the application may read and add rows,
-- never delete one, and update only api_keys.revoked_at. Audit-like tables (idempotency,
-- receipts) are insert-only.

CREATE TABLE api_clients (
    id         text PRIMARY KEY CONSTRAINT api_clients_id_safe CHECK (tollgate_safe_id(id)),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            text PRIMARY KEY CHECK (id ~ '^[a-z0-9]{12}$'),
    client_id     text NOT NULL REFERENCES api_clients (id),
    secret_sha256 text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE INDEX api_keys_client_idx ON api_keys (client_id);

CREATE TABLE api_idempotency_keys (
    client_id      text NOT NULL REFERENCES api_clients (id),
    -- printable ASCII without spaces, as the Idempotency-Key header allows
    key            text NOT NULL CHECK (key ~ '^[!-~]{1,255}$'),
    kind           text NOT NULL CHECK (kind IN ('order', 'message')),
    request_sha256 text NOT NULL CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
    entity_id      text NOT NULL CHECK (tollgate_safe_id(entity_id)),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, key)
);

CREATE TABLE api_receipts (
    id          text PRIMARY KEY CONSTRAINT api_receipts_id_safe CHECK (tollgate_safe_id(id)),
    message_id  text NOT NULL CHECK (tollgate_safe_id(message_id)),
    device_id   text NOT NULL CHECK (tollgate_safe_id(device_id)),
    kind        text NOT NULL CHECK (kind IN ('delivered', 'read')),
    outcome     text NOT NULL
                CHECK (outcome IN ('applied', 'unknown_device', 'unknown_message', 'not_running')),
    received_at timestamptz NOT NULL DEFAULT now()
);

-- The API counts lifecycles under way to refuse creates past API_MAX_OPEN_LIFECYCLES;
-- orders already have orders_status_idx (001) for theirs.
CREATE INDEX messages_delivering_idx ON messages (status)
    WHERE status IN ('INITIATED', 'STORED', 'DISPATCHED', 'FALLBACK_EMAIL');

ALTER TABLE orders ADD COLUMN client_id text REFERENCES api_clients (id);
ALTER TABLE messages ADD COLUMN client_id text REFERENCES api_clients (id);
ALTER TABLE devices ADD COLUMN client_id text REFERENCES api_clients (id);

CREATE FUNCTION devices_owner_fixed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.client_id IS DISTINCT FROM OLD.client_id THEN
        RAISE EXCEPTION 'devices %: client_id is fixed when the device is registered', OLD.id
            USING ERRCODE = 'TG002';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER devices_owner_fixed BEFORE UPDATE OF client_id ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_owner_fixed();

-- As in 003 and 005: nobody but the owner may attach the trigger function elsewhere.
REVOKE ALL ON FUNCTION devices_owner_fixed() FROM PUBLIC;

REVOKE ALL ON api_clients, api_keys, api_idempotency_keys, api_receipts FROM tollgate_app;
GRANT SELECT, INSERT ON api_clients TO tollgate_app;
GRANT SELECT, INSERT ON api_keys TO tollgate_app;
GRANT UPDATE (revoked_at) ON api_keys TO tollgate_app;
GRANT SELECT, INSERT ON api_idempotency_keys TO tollgate_app;
GRANT SELECT, INSERT ON api_receipts TO tollgate_app;
