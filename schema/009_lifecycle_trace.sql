-- Where a lifecycle's trace begins, kept with its row.
--
-- Every audit row of a lifecycle carries the lifecycle's trace id (the audit trigger
-- copies tollgate.trace_id). The workflow's own writes are in that trace by propagation
-- through Temporal; a cancel, a recall, a device's receipt or a recovery comes later,
-- from another process, and must find the trace to join it. trace_parent is the W3C
-- traceparent (version 00) of the span that created the row: a later operation on the
-- entity starts its span as a child of it, so its audit rows, its signal and what the
-- workflow does about it all land in the lifecycle's one trace.
--
-- Set once, by whoever inserts the row; frozen like every column the gate does not list
-- as mutable (the installer is run again, so the guard knows the new column).

ALTER TABLE orders
    ADD COLUMN trace_parent text
        CONSTRAINT orders_trace_parent_shape
        CHECK (trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');

ALTER TABLE messages
    ADD COLUMN trace_parent text
        CONSTRAINT messages_trace_parent_shape
        CHECK (trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');

SELECT lifecycle_install_gate(
    'orders', 'order_statuses', 'order_transition_edges', 'PENDING',
    'order_transitions', 'order_id',
    ARRAY['status', 'version', 'last_transition_id', 'failure_reason', 'cancel_reason', 'updated_at']);
SELECT lifecycle_install_gate(
    'messages', 'message_statuses', 'message_transition_edges', 'INITIATED',
    'message_transitions', 'message_id',
    ARRAY['status', 'version', 'last_transition_id', 'failure_reason', 'updated_at']);
