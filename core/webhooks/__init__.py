"""Signed webhooks (Standard Webhooks): endpoints, the delivery outbox written by a job's terminal transition,
delivery with retries, and the address rules every delivery obeys."""
