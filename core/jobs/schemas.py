"""The body of ``POST /v1/pruning-jobs``: PruneConfig's own fields and validators, plus API-only rules."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from core.jobs.model_ref import MODEL_REF_SCHEMA
from core.pruning.config import (
    NAMED_SETS,
    EvalConfig,
    PruneConfig,
    RecoveryConfig,
    lift_method_settings,
    publish_cross_field_rules,
)
from core.schema_rules import NON_BLANK, JsonSchema, at_most_one_of

# Fields a tenant may not set: the worker decides where and how code runs.
_SERVER_SIDE = {"model", "device", "trust_remote_code", "calibration", "evaluation", "recovery"}

_copied: dict[str, Any] = {
    name: (f.annotation, f) for name, f in PruneConfig.model_fields.items() if name not in _SERVER_SIDE
}
_PruneFields = create_model("_PruneFields", __config__=ConfigDict(extra="forbid"), **_copied)

CAL_ID = re.compile(r"^cal_[0-9a-f]{26}$")
NAMED_SET_SCHEMA: JsonSchema = {"enum": [*NAMED_SETS, None]}
CAL_ID_SCHEMA: JsonSchema = {"pattern": CAL_ID.pattern}
METADATA_SCHEMA: JsonSchema = {
    "maxProperties": 16,
    "propertyNames": {"minLength": 1, "maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512},
}


class _TextSourceIn(BaseModel):
    """A named set or an uploaded text set (calibration and evaluation alike)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("source", check_fields=False)
    @classmethod
    def _named(cls, v: str | None) -> str | None:
        if v is not None and v not in NAMED_SETS:
            raise ValueError(f"must be one of {', '.join(NAMED_SETS)} (upload files as calibration sets)")
        return v

    @field_validator("calibration_set_id", check_fields=False)
    @classmethod
    def _cal_id(cls, v: str | None) -> str | None:
        if v is not None and not CAL_ID.match(v):
            raise ValueError("not a calibration set id")
        return v


class CalibrationIn(_TextSourceIn):
    """At most one of `source`, `calibration_set_id`, `texts`; none: the named set c4."""

    model_config = ConfigDict(json_schema_extra=at_most_one_of("source", "calibration_set_id", "texts"))

    source: str | None = Field(
        None,
        description=f"named set: {', '.join(NAMED_SETS)}",
        examples=["c4"],
        json_schema_extra=NAMED_SET_SCHEMA,
    )
    calibration_set_id: str | None = Field(
        None, description="id of an uploaded calibration set (cal_...)", json_schema_extra=CAL_ID_SCHEMA
    )
    texts: list[str] | None = Field(
        None,
        max_length=10_000,
        description="inline texts, at least one not blank",
        json_schema_extra={"minItems": 1, "contains": {"type": "string", "pattern": NON_BLANK}},
    )
    nsamples: int = Field(128, ge=1, le=100_000)
    seqlen: int = Field(2048, ge=2, le=1_048_576)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationIn:
        given = [n for n in ("source", "calibration_set_id", "texts") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of source, calibration_set_id, texts (got {', '.join(given)})")
        return self


_EV = EvalConfig.model_fields


class EvaluationIn(_TextSourceIn):
    """Perplexity on at most one of `source`, `calibration_set_id` (none: the named set wikitext2, unless `tasks`
    are given: then only the tasks run), and lm-evaluation-harness `tasks`."""

    model_config = ConfigDict(json_schema_extra=at_most_one_of("source", "calibration_set_id"))

    source: str | None = Field(
        None, description=f"named set: {', '.join(NAMED_SETS)}", json_schema_extra=NAMED_SET_SCHEMA
    )
    calibration_set_id: str | None = Field(
        None, description="evaluate on an uploaded text set instead", json_schema_extra=CAL_ID_SCHEMA
    )
    seqlen: int | None = Field(None, ge=2)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, le=1024)
    tasks: list[str] = Field(
        default_factory=list,
        max_length=64,
        description=_EV["tasks"].description,
        json_schema_extra={"items": {"type": "string", "minLength": 1}},
    )
    task_paths: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="absolute directories of lm-eval YAML task files inside the server's allowed task roots "
        "(SECATEURS_ALLOWED_TASK_ROOTS; not stated by this schema)",
    )
    num_fewshot: int | None = Field(None, ge=0, le=1000, description=_EV["num_fewshot"].description)
    limit: int | None = Field(None, ge=1, description=_EV["limit"].description)

    @model_validator(mode="after")
    def _one(self) -> EvaluationIn:
        if self.source is not None and self.calibration_set_id is not None:
            raise ValueError("give only one of source, calibration_set_id")
        return self


_RecoverySettings = create_model(
    "_RecoverySettings",
    __config__=ConfigDict(extra="forbid"),
    **{n: (f.annotation, f) for n, f in RecoveryConfig.model_fields.items() if n not in ("source", "texts")},  # type: ignore[call-overload]
)


class RecoveryIn(_TextSourceIn, _RecoverySettings):
    """Recovery fine-tuning (the engine's `recovery` block) on at most one of `source`, `calibration_set_id`,
    `texts`; none: the calibration's text."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=at_most_one_of("source", "calibration_set_id", "texts"))

    source: str | None = Field(
        None, description=f"named set: {', '.join(NAMED_SETS)}", json_schema_extra=NAMED_SET_SCHEMA
    )
    calibration_set_id: str | None = Field(
        None, description="fine-tune on an uploaded text set (cal_...)", json_schema_extra=CAL_ID_SCHEMA
    )
    texts: list[str] | None = Field(
        None,
        max_length=10_000,
        description="inline texts, at least one not blank",
        json_schema_extra={"minItems": 1, "contains": {"type": "string", "pattern": NON_BLANK}},
    )

    @model_validator(mode="after")
    def _one_source(self) -> RecoveryIn:
        given = [n for n in ("source", "calibration_set_id", "texts") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of source, calibration_set_id, texts (got {', '.join(given)})")
        return self


EXAMPLES = [
    {
        "model": "meta-llama/Llama-3.2-1B",
        "method": "wanda",
        "sparsity": 0.5,
        "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048},
        "metadata": {"team": "search"},
    },
    {"model": "s3://models/llama-3.2-1b/", "method": "sparsegpt", "pattern": "2:4"},
]


def _published(schema: JsonSchema) -> None:
    """PruneConfig's rules across fields (which JobService.build_config enforces) and the body's examples."""
    publish_cross_field_rules(schema)
    schema["examples"] = EXAMPLES


class JobCreate(_PruneFields):
    model: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        description="Hugging Face hub id (org/name) or an s3:// prefix; where the server allows local models, also "
        "an absolute path of a model directory inside one of its allowed roots (not stated by this schema: it "
        "depends on the server's configuration and files)",
        examples=["meta-llama/Llama-3.2-1B"],
        json_schema_extra=MODEL_REF_SCHEMA,
    )
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    evaluation: EvaluationIn | None = None
    recovery: RecoveryIn | None = Field(None, description="fine-tune after pruning, masks held exactly")
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="up to 16 string pairs (keys 1-64, values up to 512 characters), echoed back",
        json_schema_extra=METADATA_SCHEMA,
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_method_settings(cls, data: Any) -> Any:
        """Bodies written before `method_options` existed (flat `percdamp`, `blocksize`, ...) keep working."""
        return lift_method_settings(data, set(cls.model_fields)) if isinstance(data, dict) else data

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        for k, val in v.items():
            if not 1 <= len(k) <= 64:
                raise ValueError(f"key {k[:70]!r} must be 1-64 characters")
            if len(val) > 512:
                raise ValueError(f"value of {k!r} must be at most 512 characters")
        return v

    model_config = ConfigDict(extra="forbid", json_schema_extra=_published)
