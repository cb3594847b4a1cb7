"""Operator jobs: backfill, verify, replay and reconcile (orchestration over core and store)."""
