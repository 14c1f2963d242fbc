"""PruneConfig's validators, restated as JSON Schema for the published API: what a field must look like where its
type cannot say it, and the rules across fields (what a run prunes to, which schedule fits it, each method's
own settings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.schema_rules import JsonSchema, given

if TYPE_CHECKING:
    from core.pruning.methods.base import Method

NM_MAX_DIGITS = 3  # the published N:M spelling goes up to M = 999
SWEEP_MAX = 16  # targets in one sweep job
SWEEP_MAX_MIXED_PATTERNS = 4  # a sweep of ratios and patterns: at most this many patterns (and 16 - 4 ratios)


def _nm_regex(max_digits: int) -> str:
    """N:M in decimal without leading zeros, 0 < N < M < 10**max_digits. No regular expression compares two
    unbounded numbers, so the length is bounded: N has fewer digits than M, or as many, the same up to the
    first digit that differs (a backreference repeats that prefix), where N's is the smaller."""

    def digits(count: int) -> str:
        return "" if count == 0 else "[0-9]" if count == 1 else f"[0-9]{{{count}}}"

    alternatives = [
        f"[1-9]{digits(n_len - 1)}:[1-9][0-9]{{{n_len},{max_digits - 1}}}" for n_len in range(1, max_digits)
    ]
    group = 0
    for length in range(1, max_digits + 1):
        for first_difference in range(length):
            tail = digits(length - first_difference - 1)
            for d in range(0 if first_difference else 1, 9):
                above = f"[{d + 1}-9]"  # a class, never a bare digit: after a backreference it would extend it
                if first_difference:
                    group += 1
                    prefix, same_prefix = f"([1-9]{digits(first_difference - 1)})", f"\\{group}"
                else:
                    prefix = same_prefix = ""
                alternatives.append(f"{prefix}{d}{tail}:{same_prefix}{above}{tail}")
    return "|".join(alternatives)


NM = _nm_regex(NM_MAX_DIGITS)
PATTERN_FIELD: JsonSchema = {
    "pattern": f"^(?:unstructured|{NM})$",
    "description": "'unstructured', or N:M with 0 < N < M: at most N non-zeros in every M inputs (2:4, 4:8). "
    f"Spelled here up to M = {10**NM_MAX_DIGITS - 1} without leading zeros; the server also takes larger M, "
    "leading zeros and surrounding spaces",
}
NM_GIVEN = given("pattern", {"type": "string", "pattern": f"^(?:{NM})$"})
SPARSITY_GIVEN = given("sparsity", {"type": "number"})
UNIFORM_SCHEDULE: JsonSchema = {"properties": {"schedule": {"properties": {"kind": {"const": "uniform"}}}}}


def schedule_kind(kind: str) -> JsonSchema:
    return {"required": ["kind"], "properties": {"kind": {"const": kind}}}


# ScheduleConfig._needs
SCHEDULE_RULES: JsonSchema = {
    "allOf": [
        {"anyOf": [{"not": schedule_kind("explicit")}, given("values")]},
        {"anyOf": [{"not": schedule_kind("linear")}, {"allOf": [given("first"), given("last")]}]},
    ]
}
STRUCTURE_PARTS = ("mlp_channels", "heads", "blocks")
# StructureConfig._something
STRUCTURE_RULES: JsonSchema = {
    "anyOf": [given(part, {"type": "number", "exclusiveMinimum": 0}) for part in STRUCTURE_PARTS]
}
SPARSITIES_GIVEN = given("sparsities", {"type": "array", "minItems": 1})
PATTERNS_GIVEN = given("patterns", {"type": "array", "minItems": 1})
SWEEP_GIVEN: JsonSchema = {"anyOf": [given("sparsities"), given("patterns")]}
NOT_EMPTY_LIST: JsonSchema = {"type": "array", "minItems": 1}
# PruneConfig._target and _check_sweep
TARGET_RULES: list[JsonSchema] = [
    {"anyOf": [SPARSITY_GIVEN, NM_GIVEN, given("structure", {"type": "object"}), SPARSITIES_GIVEN, PATTERNS_GIVEN]},
    # a sweep is one of the targets on its own: no single sparsity, pattern or structure beside it
    {"not": {"allOf": [SWEEP_GIVEN, {"anyOf": [given("sparsity"), NM_GIVEN, given("structure")]}]}},
    {"anyOf": [{"not": NM_GIVEN}, UNIFORM_SCHEDULE]},
    {"anyOf": [{"not": PATTERNS_GIVEN}, UNIFORM_SCHEDULE]},
    {"anyOf": [UNIFORM_SCHEDULE, SPARSITY_GIVEN, {"allOf": [SPARSITIES_GIVEN, {"not": PATTERNS_GIVEN}]}]},
    # both ratios and patterns: at most 4 patterns and 12 ratios
    {
        "anyOf": [
            {"not": {"allOf": [SPARSITIES_GIVEN, PATTERNS_GIVEN]}},
            {
                "properties": {
                    "sparsities": {"maxItems": SWEEP_MAX - SWEEP_MAX_MIXED_PATTERNS},
                    "patterns": {"maxItems": SWEEP_MAX_MIXED_PATTERNS},
                }
            },
        ]
    },
    # a sweep fine-tunes nothing: no recovery or gradual pruning beside it
    {"not": {"allOf": [SWEEP_GIVEN, {"anyOf": [given("recovery"), given("gradual")]}]}},
    # gradual pruning climbs to an unstructured sparsity target (no N:M pattern)
    {"anyOf": [{"not": given("gradual")}, {"allOf": [SPARSITY_GIVEN, {"not": NM_GIVEN}]}]},
    # export_* name sweep targets: not given (or empty) without the sweep
    {"anyOf": [given("sparsities"), {"not": given("export_sparsities", NOT_EMPTY_LIST)}]},
    {"anyOf": [given("patterns"), {"not": given("export_patterns", NOT_EMPTY_LIST)}]},
]


def method_rules(methods: Mapping[str, type[Method]], default: str) -> list[JsonSchema]:
    """PruneConfig._method_options: `method_options` are the chosen method's settings, and meet the rules its
    options state for the rest of the config (their `conflicts`). Without `method`, the default one is chosen."""
    branches = []
    for name, method in sorted(methods.items()):
        options = method.Options.model_json_schema()
        options.pop("title", None)
        branch: JsonSchema = {"properties": {"method": {"const": name}, "method_options": options}}
        if name != default:
            branch["required"] = ["method"]
        rules = method.Options.config_rules()
        if rules:
            branch["allOf"] = rules
        branches.append(branch)
    return [{"anyOf": branches}]


def cross_field_rules(methods: Mapping[str, type[Method]], default_method: str) -> list[dict[str, Any]]:
    return [*TARGET_RULES, *method_rules(methods, default_method)]
