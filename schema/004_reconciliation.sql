-- Reconciliation: what the reconciler found when it compared Postgres with Temporal,
-- and the one edge a recovery needs that the order graph lacked.
--
-- A row whose workflow is gone (terminated from the Web UI, say) cannot finish by
-- itself. The reconciler's recovery run compensates from the providers' idempotency
-- keys and ends the row FAILED; from PENDING that needs PENDING -> FAILED, an edge no
-- running workflow takes (a live order always passes through VALIDATING).

INSERT INTO order_transition_edges (from_status, to_status) VALUES ('PENDING', 'FAILED');

CREATE TABLE reconciliation_findings (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id             text NOT NULL,
    entity_kind        text NOT NULL CHECK (entity_kind IN ('order', 'message')),
    entity_id          text NOT NULL,
    -- orphaned: the row is not at rest but its workflow is not running
    -- disagreement: the workflow's result and the row name different final states
    finding            text NOT NULL CHECK (finding IN ('orphaned', 'disagreement')),
    row_status         text NOT NULL,
    workflow_status    text,
    detail             text NOT NULL,
    repair_workflow_id text,
    found_at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX reconciliation_findings_entity_idx ON reconciliation_findings (entity_kind, entity_id);

-- The reconciler runs as the application role (worker activity, or starter.py): it
-- records findings and reads them back, and may never rewrite one.
GRANT SELECT, INSERT ON reconciliation_findings TO tollgate_app;
