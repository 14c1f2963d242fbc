"""Structured pruning: physically smaller dense models (fewer MLP channels, attention heads, blocks)."""

from core.pruning.structured.apply import apply_structure, plan

__all__ = ["apply_structure", "plan"]
