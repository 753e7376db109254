"""Workflows: orchestration only. Deterministic; every side effect is an activity."""
