"""Tollgate: durable business lifecycles on Temporal, with Postgres-guarded state."""
