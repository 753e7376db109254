-- One gate in SQL too: orders move onto the generic lifecycle_guard and lifecycle_audit
-- that messages have used since 002, and their own trigger functions go.
--
-- Same rules as before, for both tables: an insert must be in the initial state and
-- gets version 1; only the listed columns may change; a terminal row is frozen; a
-- status change must be an edge of the table's graph (SQLSTATE TG001, TG002, TG004); the
-- version is bumped on every update; every status change is appended to the audit by
-- the database, with the writer's description. Errors name the table ("illegal orders
-- transition PENDING -> COMPLETED for o-1"), as they always did for messages.

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
