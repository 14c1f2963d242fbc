"""Pruning jobs: state machine, API-facing service, worker-facing service."""
