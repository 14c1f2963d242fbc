"""What a pruning run is asked to do: one validated object shared by the CLI, the API and the worker."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from core.pruning.config_schema import (
    NM,
    PATTERN_FIELD,
    SCHEDULE_RULES,
    STRUCTURE_RULES,
    SWEEP_MAX,
    SWEEP_MAX_MIXED_PATTERNS,
    cross_field_rules,
)
from core.schema_rules import NON_BLANK, JsonSchema

if TYPE_CHECKING:
    from core.pruning.methods.base import Method

NAMED_SETS = ("c4", "wikitext2", "ptb")


def registered_methods() -> dict[str, type[Method]]:
    """Every method class by name. Imported on first use: the methods import torch, and they import this module."""
    from core.pruning.methods import REGISTRY

    return REGISTRY


def _registered(name: str) -> str:
    known = registered_methods()
    if name not in known:
        raise PydanticCustomError(
            "unknown_method",
            "unknown method '{name}'; choose one of {known}",
            {"name": name, "known": ", ".join(sorted(known))},
        )
    return name


class _RegisteredNamesSchema:
    """Publishes the registered method names as the JSON-schema enum, read when the schema is generated."""

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "enum": sorted(registered_methods())}


# Annotated metadata travels with the field, so models that copy PruneConfig's fields (the job API) check it too.
MethodName = Annotated[str, AfterValidator(_registered), _RegisteredNamesSchema()]


def method_option_owners(option: str) -> list[str]:
    """Names of the methods that declare `option` among their settings."""
    return sorted(n for n, m in registered_methods().items() if option in m.Options.model_fields)


def lift_method_settings(data: dict[str, Any], model_fields: set[str]) -> dict[str, Any]:
    """Accept a method setting written flat beside `method` (the layout before `method_options`): it moves into
    `method_options` when the chosen method declares it, is dropped when it belongs to another method and holds
    that method's default (stored configs carry every method's settings), and is refused otherwise."""
    method = data.get("method", "wanda")
    known = registered_methods()
    if not isinstance(method, str) or method not in known or not isinstance(data.get("method_options") or {}, dict):
        return data  # the field's own error is the one to report
    lifted, options, refused = dict(data), dict(data.get("method_options") or {}), []
    for key, value in data.items():
        owners = [] if key in model_fields else method_option_owners(key)
        if not owners:
            continue
        del lifted[key]
        if method in owners:
            options.setdefault(key, value)
        elif any(known[o].Options.model_fields[key].default != value for o in owners):
            refused.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "foreign_method_option",
                        "a setting of {owners}, not of the chosen method {method}",
                        {"owners": " and ".join(owners), "method": method},
                    ),
                    loc=(key,),
                    input=value,
                )
            )
    if refused:
        raise ValidationError.from_exception_data("PruneConfig", refused)
    if options:
        lifted["method_options"] = options
    return lifted


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Strict):
    """Fixed-length token windows drawn from one source (no padding)."""

    source: str = Field("c4", description="named set (c4, wikitext2, ptb) or a local .txt/.jsonl/.pt/.npy file")
    texts: list[str] | None = Field(
        None,
        description="inline texts; used instead of `source` when given",
        json_schema_extra={"minItems": 1, "contains": {"type": "string", "pattern": NON_BLANK}},
    )
    nsamples: int = Field(128, ge=1, le=100_000, description="calibration windows")
    seqlen: int = Field(2048, ge=2, le=1_048_576, description="tokens per window (capped at the model's limit)")
    seed: int = Field(0, description="calibration sampling seed")

    @field_validator("texts")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not any(t.strip() for t in v):
            raise ValueError("must contain at least one non-empty text")
        return v


class EvalConfig(_Strict):
    """Before and after pruning: perplexity (documents joined with "\\n\\n", tokenised once, non-overlapping
    windows) and lm-evaluation-harness tasks. Perplexity runs when `source` is set; it defaults to wikitext2
    unless `tasks` are given (then only the tasks run, unless `source` is given too)."""

    source: str | None = Field(
        "wikitext2",
        description="perplexity on a named set (wikitext2, c4, ptb) or a local text file; none (null) when `tasks` "
        "are given without it",
    )
    seqlen: int | None = Field(None, ge=2, description="default: the calibration seqlen")
    max_windows: int | None = Field(None, ge=1, description="evaluate only the first N windows")
    batch_size: int = Field(8, ge=1, le=1024, description="windows per forward pass (lm-eval: its batch size)")
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks (or groups) by name, comma-separated or repeated: lm-eval's own, "
        "the shipped tinystories_continuation, or those under task_paths",
        json_schema_extra={"items": {"type": "string", "minLength": 1}},
    )
    task_paths: list[str] = Field(
        default_factory=list,
        description="directories of local lm-eval YAML task files (the service: inside its allowed task roots)",
    )
    num_fewshot: int | None = Field(None, ge=0, le=1000, description="lm-eval few-shot examples (default: the task's)")
    limit: int | None = Field(None, ge=1, description="lm-eval: score only the first N documents of each task")

    @model_validator(mode="before")
    @classmethod
    def _tasks_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tasks") and "source" not in data:
            return {**data, "source": None}
        return data

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            names = [n.strip() for x in v for n in x.split(",")]
            if any(not n for n in names):
                raise ValueError("task names must not be empty")
            return list(dict.fromkeys(names))
        return v

    @model_validator(mode="after")
    def _something(self) -> EvalConfig:
        if self.source is None and not self.tasks:
            raise ValueError("evaluation needs a perplexity `source` or `tasks`")
        return self


class ScheduleConfig(_Strict):
    """How the target sparsity is spread over blocks (unstructured and N:M-free runs)."""

    model_config = ConfigDict(json_schema_extra=SCHEDULE_RULES)

    kind: Literal["uniform", "explicit", "linear", "owl"] = Field("uniform", description="how sparsity varies by block")
    values: list[float] | None = Field(
        None,
        description="explicit: one sparsity per block",
        json_schema_extra={"minItems": 1, "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}},
    )
    first: float | None = Field(None, ge=0, lt=1, description="linear: sparsity of the first block")
    last: float | None = Field(None, ge=0, lt=1, description="linear: sparsity of the last block")
    owl_m: float = Field(5.0, gt=0, description="OWL: outlier threshold M (times the mean score)")
    owl_lambda: float = Field(0.08, ge=0, lt=1, description="OWL: maximum deviation λ from the target")

    @field_validator("values")
    @classmethod
    def _in_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if not v:
                raise ValueError("must not be empty")
            bad = [x for x in v if not 0 <= x < 1]
            if bad:
                raise ValueError(f"every value must be in [0, 1), got {bad[0]}")
        return v

    @model_validator(mode="after")
    def _needs(self) -> ScheduleConfig:
        if self.kind == "explicit" and self.values is None:
            raise ValueError("schedule kind 'explicit' needs `values`")
        if self.kind == "linear" and (self.first is None or self.last is None):
            raise ValueError("schedule kind 'linear' needs `first` and `last`")
        return self


class StructureConfig(_Strict):
    """Structured pruning: physically remove MLP channels, attention heads (KV groups) or whole blocks."""

    model_config = ConfigDict(json_schema_extra=STRUCTURE_RULES)

    mlp_channels: float = Field(0.0, ge=0, lt=1, description="fraction of MLP intermediate channels to remove")
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads (whole KV groups) to remove")
    blocks: float = Field(0.0, ge=0, lt=1, description="fraction of decoder blocks to remove")
    score: Literal["activation", "weight"] = Field("activation", description="how channels and heads are scored")
    bias_compensation: bool = Field(False, description="FLAP bias compensation for what is removed")

    @model_validator(mode="after")
    def _something(self) -> StructureConfig:
        if not (self.mlp_channels or self.heads or self.blocks):
            raise ValueError("structure needs at least one of mlp_channels, heads, blocks > 0")
        return self


class LoraConfig(_Strict):
    """LoRA adapters (peft) on the pruned linear layers; merged into the weights at the end and re-masked."""

    r: int = Field(16, ge=1, le=4096, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    targets: list[str] = Field(
        default_factory=list,
        description="regexes of the pruned layers that get adapters (default: every pruned layer)",
        json_schema_extra={"items": {"type": "string", "format": "regex"}},
    )

    @field_validator("targets")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for r in v:
            _compile(r)
        return v


class RecoveryConfig(_Strict):
    """Fine-tuning after pruning with the masks held exactly: every pruned weight stays 0 after every step."""

    source: str | None = Field(
        None,
        description="named set (c4, wikitext2, ptb) or a local .txt/.jsonl/.pt/.npy file (default: the calibration "
        "source); windows never overlap the evaluated text when both come from one file",
    )
    texts: list[str] | None = Field(
        None,
        description="inline texts; used instead of `source` when given",
        json_schema_extra={"minItems": 1, "contains": {"type": "string", "pattern": NON_BLANK}},
    )
    steps: int = Field(100, ge=1, le=10_000_000, description="optimizer steps (gradual: spread over the stages)")
    lr: float = Field(1e-4, gt=0, le=10, description="peak learning rate (AdamW; warmup, then cosine decay)")
    mode: Literal["full", "lora"] = Field("full", description="full: every kept weight trains; lora: peft LoRA")
    batch_size: int = Field(8, ge=1, le=4096, description="windows per micro-batch")
    seqlen: int | None = Field(None, ge=2, le=1_048_576, description="tokens per window (default: calibration's)")
    seed: int = Field(0, description="window sampling and LoRA initialisation seed")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay")
    grad_accum: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (none: no clipping)")
    distill: bool = Field(
        False, description="loss = KL to the dense model's logits (a dense copy is kept in memory as the teacher)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("texts")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not any(t.strip() for t in v):
            raise ValueError("must contain at least one non-empty text")
        return v


class GradualConfig(_Strict):
    """Prune in `stages` steps s1 < ... < sk = target, recovering (and recalibrating) between them."""

    stages: int = Field(3, ge=2, le=100, description="pruning stages up to the target")
    schedule: Literal["cubic", "linear"] = Field(
        "cubic", description="cubic: s_i = s·(1 − (1 − i/k)³) (Zhu & Gupta 2017); linear: s·i/k"
    )


class ExportConfig(_Strict):
    save_model: bool = Field(True, description="write the pruned model")
    masks: bool = Field(True, description="write masks.safetensors")
    compact: bool = Field(
        False,
        description="also write the compact sparse checkpoint (non-zero values + "
        "bitmask or 2:4 positions, exponent bytes compressed)",
    )
    max_shard_size: str = Field("2GB", description="largest safetensors shard of the written model")


_PATTERN = re.compile(r"^(\d+):(\d+)$")


def publish_cross_field_rules(schema: JsonSchema) -> None:
    """The rules PruneConfig's model validators enforce, stated in its JSON schema (and in models copying its
    fields, such as the job API's body)."""
    default_method = PruneConfig.model_fields["method"].default
    schema.setdefault("allOf", []).extend(cross_field_rules(registered_methods(), default_method))


class PruneConfig(_Strict):
    model_config = ConfigDict(json_schema_extra=publish_cross_field_rules)

    model: str = Field(..., min_length=1, description="Hugging Face hub id or local directory")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="weights' dtype")
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub")
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")

    method: MethodName = Field("wanda", description="a registered pruning method")
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="settings of the chosen method (its `Options`); those not given take the method's defaults",
    )
    sparsity: float | None = Field(None, ge=0, lt=1, description="unstructured target in [0, 1)")
    pattern: str | None = Field(
        None, description=PATTERN_FIELD["description"], json_schema_extra={"pattern": PATTERN_FIELD["pattern"]}
    )

    sparsities: list[float] | None = Field(
        None,
        description="a sweep: several unstructured targets in one job (instead of `sparsity`); the model, the "
        "calibration windows and the dense evaluation are shared",
        json_schema_extra={
            "minItems": 1,
            "maxItems": SWEEP_MAX,
            "uniqueItems": True,
            "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        },
    )
    patterns: list[str] | None = Field(
        None,
        description="a sweep: several N:M patterns in one job (instead of `pattern`; with `sparsities` at most "
        f"{SWEEP_MAX_MIXED_PATTERNS} patterns and {SWEEP_MAX - SWEEP_MAX_MIXED_PATTERNS} ratios)",
        json_schema_extra={
            "minItems": 1,
            "maxItems": SWEEP_MAX,
            "uniqueItems": True,
            "items": {"type": "string", "pattern": f"^(?:{NM})$"},
        },
    )
    export_sparsities: list[float] = Field(
        default_factory=list,
        description="sweep targets (each must be among `sparsities`) whose pruned model and masks are written; "
        "the others give metrics only",
        json_schema_extra={"maxItems": SWEEP_MAX, "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}},
    )
    export_patterns: list[str] = Field(
        default_factory=list,
        description="sweep patterns (each must be among `patterns`) whose pruned model and masks are written",
        json_schema_extra={"maxItems": SWEEP_MAX, "items": {"type": "string", "pattern": f"^(?:{NM})$"}},
    )

    true_sequential: bool = Field(False, description="prune [q,k,v]→[o]→[gate,up]→[down] in turn")
    propagate: Literal["pruned", "dense"] = Field(
        "pruned", description="what the next block is calibrated on: pruned (the papers) or dense block outputs"
    )

    exclude: list[str] = Field(
        default_factory=list,
        description="regexes of layer names never pruned",
        json_schema_extra={"items": {"type": "string", "format": "regex"}},
    )
    overrides: dict[str, float] = Field(
        default_factory=dict,
        description="regex of layer name -> sparsity",
        json_schema_extra={
            "propertyNames": {"format": "regex"},
            "additionalProperties": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        },
    )

    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvalConfig | None = None
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    structure: StructureConfig | None = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    recovery: RecoveryConfig | None = Field(None, description="fine-tune after pruning, masks held exactly")
    gradual: GradualConfig | None = Field(None, description="prune in stages, recovering between them")

    @model_validator(mode="before")
    @classmethod
    def _flat_method_settings(cls, data: Any) -> Any:
        return lift_method_settings(data, set(cls.model_fields)) if isinstance(data, dict) else data

    @field_validator("method_options")
    @classmethod
    def _method_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:  # invalid: reported on its own field
            return v
        return registered_methods()[method].Options.model_validate(v).model_dump()

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None or v == "unstructured":
            return None
        return _nm_pattern(v)

    @field_validator("patterns", "export_patterns")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = [_nm_pattern(p, "must be N:M such as 2:4") for p in v]
        if len(set(out)) != len(out):
            raise ValueError("every pattern at most once")
        return out

    @field_validator("sparsities", "export_sparsities")
    @classmethod
    def _ratios(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return None
        bad = [x for x in v if not 0 <= x < 1]
        if bad:
            raise ValueError(f"every sparsity must be in [0, 1), got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError("every sparsity at most once")
        return v

    @field_validator("exclude")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for r in v:
            _compile(r)
        return v

    @field_validator("overrides")
    @classmethod
    def _override_values(cls, v: dict[str, float]) -> dict[str, float]:
        for r, s in v.items():
            _compile(r)
            if not 0 <= s < 1:
                raise ValueError(f"sparsity for {r!r} must be in [0, 1), got {s}")
        return v

    @model_validator(mode="after")
    def _target(self) -> PruneConfig:
        if self.is_sweep:
            self._check_sweep()
            return self
        for name in ("export_sparsities", "export_patterns"):
            if getattr(self, name):
                _field_error(name, "sweep_export", "names sweep targets; give `sparsities` or `patterns`")
        if self.sparsity is None and self.pattern is None and self.structure is None:
            raise ValueError("give `sparsity`, an N:M `pattern`, or a `structure` block")
        if self.nm is not None and self.schedule.kind != "uniform":
            raise ValueError("layer-wise schedules apply to unstructured sparsity, not N:M patterns")
        if self.schedule.kind != "uniform" and self.sparsity is None:
            raise ValueError("a non-uniform schedule needs a `sparsity` target")
        if self.gradual is not None:
            if self.nm is not None:
                _field_error(
                    "gradual",
                    "invalid_combination",
                    "gradual pruning needs an unstructured `sparsity` target: an N:M pattern has no increasing "
                    "ratios on the way to it (prune N:M one-shot and use `recovery`)",
                )
            if self.sparsity is None:
                _field_error(
                    "gradual", "invalid_combination", "gradual pruning needs an unstructured `sparsity` target"
                )
        return self

    def _check_sweep(self) -> None:
        ratios, pats = self.sparsities or [], self.patterns or []
        for name in ("recovery", "gradual"):
            if getattr(self, name) is not None:
                _field_error(
                    name,
                    "sweep_exclusive",
                    f"a sweep (`sparsities`/`patterns`) takes no `{name}`: choose the target from the sweep, then "
                    f"run it as a job of its own with `{name}`",
                )
        for name in ("sparsity", "pattern", "structure"):
            if getattr(self, name) is not None:
                _field_error(name, "sweep_exclusive", f"a sweep (`sparsities`/`patterns`) takes no `{name}`")
        for name, given in (("sparsities", self.sparsities), ("patterns", self.patterns)):
            if given is not None and not given:
                _field_error(name, "sweep_empty", "must list at least one target")
        if (
            ratios
            and pats
            and (len(pats) > SWEEP_MAX_MIXED_PATTERNS or len(ratios) > SWEEP_MAX - SWEEP_MAX_MIXED_PATTERNS)
        ):
            name = "patterns" if len(pats) > SWEEP_MAX_MIXED_PATTERNS else "sparsities"
            _field_error(
                name,
                "sweep_too_many",
                f"a sweep of both takes at most {SWEEP_MAX_MIXED_PATTERNS} patterns and "
                f"{SWEEP_MAX - SWEEP_MAX_MIXED_PATTERNS} ratios",
            )
        for name, items in (("sparsities", list(ratios)), ("patterns", list(pats))):
            if len(items) > SWEEP_MAX:
                _field_error(name, "sweep_too_many", f"a sweep takes at most {SWEEP_MAX} targets")
        swept = set(ratios)
        missing = [x for x in self.export_sparsities if x not in swept]
        if missing:
            _field_error("export_sparsities", "sweep_export", f"{missing[0]:g} is not among `sparsities`")
        missing_p = [p for p in self.export_patterns if p not in pats]
        if missing_p:
            _field_error("export_patterns", "sweep_export", f"{missing_p[0]} is not among `patterns`")
        if self.schedule.kind != "uniform":
            if pats:
                _field_error(
                    "patterns",
                    "sweep_schedule",
                    "layer-wise schedules apply to unstructured sparsity, not N:M patterns",
                )

    @property
    def is_sweep(self) -> bool:
        return self.sparsities is not None or self.patterns is not None

    def sweep_targets(self) -> list[PruneConfig]:
        """One single-target config per sweep target (ratios, then patterns), each as a single job would be
        given; its export settings apply to the targets marked for export, the others write metrics only."""
        marked_r = set(self.export_sparsities)
        base = self.model_dump(exclude={"sparsities", "patterns", "export_sparsities", "export_patterns"})
        out = []
        targets: list[tuple[str, Any, bool]] = [("sparsity", x, x in marked_r) for x in self.sparsities or []]
        targets += [("pattern", p, p in self.export_patterns) for p in self.patterns or []]
        for key, value, exported in targets:
            data = {**base, key: value}
            if not exported:
                data["export"] = {**data["export"], "save_model": False, "masks": False, "compact": False}
            out.append(PruneConfig.model_validate(data))
        return out

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        """Fraction of weights removed in each pruned layer: 1 − N/M for N:M, else `sparsity`."""
        if self.nm is not None:
            n, m = self.nm
            return 1 - n / m
        return self.sparsity or 0.0


def _nm_pattern(v: str, wrong: str = "must be 'unstructured' or N:M such as 2:4") -> str:
    m = _PATTERN.match(v.strip())
    if not m:
        raise ValueError(wrong)
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{mm}")
    return f"{n}:{mm}"


def _field_error(name: str, kind: str, message: str) -> None:
    """A validation error located at `name` (a model validator's own errors have no location)."""
    err = PydanticCustomError(kind, "{message}", {"message": message})
    raise ValidationError.from_exception_data("PruneConfig", [InitErrorDetails(type=err, loc=(name,), input=None)])


def _compile(r: str) -> re.Pattern[str]:
    try:
        return re.compile(r)
    except (re.error, OverflowError, RecursionError) as e:  # a repeat count or nesting past what re takes
        raise ValueError(f"invalid regex {r!r}: {e}") from e
