"""Every check of a run's inputs that needs no model: files exist and parse, named sets can be loaded, options
fit together, the output directory is usable. The CLI, prune() and the job service run it before any loading,
so a typo costs a second, not a 70B model load."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.pruning import tasks
from core.pruning.config import NAMED_SETS, PruneConfig, registered_methods
from core.pruning.errors import PruningError
from core.pruning.locations import is_local_model
from core.pruning.texts import parse_documents

UPLOADED = "uploaded:"  # a text set the job service stores; only the service can say where it is
TOKEN_FILES = (".pt", ".npy")
OUT = "out"  # the field name of problems with the output directory


@dataclass(frozen=True)
class Problem:
    field: str  # dotted PruneConfig path ("calibration.source"), or OUT
    message: str
    code: str  # what a failed job reports for it (PruningError codes)


class PreflightError(PruningError):
    """Every problem found before loading, in one error; `code` is the first problem's."""

    def __init__(self, problems: list[Problem]):
        super().__init__(describe(problems))
        self.problems = problems
        self.code = problems[0].code


class OutputDirPreflightError(PreflightError, FileExistsError):
    """Raised when one of the problems is the output directory: callers have caught FileExistsError for that."""


def check(
    config: PruneConfig,
    out_dir: Path | str | None = None,
    *,
    resolve_upload: Callable[[str], Path | None] | None = None,
    on_this_machine: bool = True,
) -> list[Problem]:
    """The problems of `config` (and of `out_dir`, when given), in field order; empty when it can run.

    `uploaded:<id>` text sources are checked through `resolve_upload(id)` (the file's local path, or None to
    skip it) and skipped without it. With `on_this_machine=False` (a service validating a job that another
    machine runs), the local model directory and the device are not looked at."""
    problems: list[Problem] = []
    if on_this_machine:
        problems += _model(config.model)
        problems += _device(config.device)
    if config.calibration.texts is None:
        problems += _text_source(
            "calibration.source",
            config.calibration.source,
            "calibration_error",
            resolve_upload,
            on_this_machine,
            tokens_allowed=True,
        )
    if config.evaluation is not None and config.evaluation.source is not None:
        problems += _text_source(
            "evaluation.source",
            config.evaluation.source,
            "evaluation_error",
            resolve_upload,
            on_this_machine,
            tokens_allowed=False,
        )
    rc = config.recovery
    if rc is not None and rc.texts is None and rc.source is not None:
        problems += _text_source(
            "recovery.source", rc.source, "recovery_data_error", resolve_upload, on_this_machine, tokens_allowed=True
        )
    problems += tasks.problems(config.evaluation, on_this_machine=on_this_machine)
    problems += _combinations(config, on_this_machine)
    if out_dir is not None:
        problems += out_dir_problems(Path(out_dir))
    return problems


def raise_on_problems(config: PruneConfig, out_dir: Path | str | None = None) -> None:
    problems = check(config, out_dir)
    if any(p.field == OUT for p in problems):
        raise OutputDirPreflightError(problems)
    if problems:
        raise PreflightError(problems)


def describe(problems: list[Problem], names: Mapping[str, str] | None = None) -> str:
    """One line for one problem; a list under a heading for several. `names` renames fields (CLI flags)."""
    lines = [f"{(names or {}).get(p.field, p.field)}: {p.message}" for p in problems]
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems, found before loading the model:\n" + "\n".join(f"  {ln}" for ln in lines)


def out_dir_problems(out_dir: Path) -> list[Problem]:
    if out_dir.exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            return [Problem(OUT, f"output directory {out_dir} exists and is not empty", "output_not_empty")]
        return []
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        return [Problem(OUT, f"cannot create {out_dir}: {ancestor} is not a writable directory", "output_not_writable")]
    return []


def _model(ref: str) -> list[Problem]:
    if not is_local_model(ref):
        return []  # a hub id: only loading can tell
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_dir():
        return [Problem("model", f"directory {ref} does not exist", "model_not_found")]
    cfg = path / "config.json"
    if not cfg.is_file():
        return [Problem("model", f"{ref} has no config.json: not a Hugging Face model directory", "invalid_model")]
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [Problem("model", f"{cfg} cannot be read as JSON: {e}", "invalid_model")]
    return []


def _device(name: str) -> list[Problem]:
    if name == "auto" or name == "cpu":
        return []
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        return [Problem("device", f"not a device: {e}", "invalid_config")]
    if dev.type == "cuda" and not torch.cuda.is_available():
        return [Problem("device", f"{name!r} requested but CUDA is not available", "invalid_config")]
    return []


def _text_source(
    field: str,
    source: str,
    code: str,
    resolve_upload: Callable[[str], Path | None] | None,
    on_this_machine: bool,
    tokens_allowed: bool,
) -> list[Problem]:
    if source in NAMED_SETS:
        if on_this_machine and importlib.util.find_spec("datasets") is None:
            return [
                Problem(
                    field,
                    f"named set {source!r} needs the `datasets` package "
                    "(pip install 'secateurs[datasets]'), or pass a local file",
                    code,
                )
            ]
        return []
    if source.startswith(UPLOADED):
        local = resolve_upload(source.removeprefix(UPLOADED)) if resolve_upload else None
        return [] if local is None else _text_file(field, local, code, tokens_allowed)
    path = Path(source).expanduser()
    if not path.is_file():
        return [
            Problem(field, f"{source!r} is neither a named set ({', '.join(NAMED_SETS)}) nor an existing file", code)
        ]
    return _text_file(field, path, code, tokens_allowed)


def _text_file(field: str, path: Path, code: str, tokens_allowed: bool) -> list[Problem]:
    if path.suffix in TOKEN_FILES:
        if not tokens_allowed:
            return [Problem(field, f"{path.name}: token ids cannot be evaluated, give a text file", code)]
        if not os.access(path, os.R_OK):
            return [Problem(field, f"{path} is not readable", code)]
        return []  # read when the windows are drawn (torch or numpy)
    try:
        parse_documents(path.read_text(encoding="utf-8"), jsonl=path.suffix == ".jsonl")
    except OSError as e:
        return [Problem(field, f"cannot read {path}: {e.strerror or e}", code)]
    except UnicodeDecodeError as e:
        return [Problem(field, f"{path.name} is not UTF-8 text: {e}", code)]
    except ValueError as e:
        return [Problem(field, f"{path.name} {e}", code)]
    return []


def _combinations(config: PruneConfig, on_this_machine: bool) -> list[Problem]:
    """What the config cannot check alone: its method's own rules, and a schedule against the model's depth."""
    method = registered_methods()[config.method]
    problems = [
        Problem(f"method_options.{name}", msg, "invalid_config")
        for name, msg in method.Options.model_validate(config.method_options).conflicts(config)
    ]
    sc = config.schedule
    removes_blocks = config.structure is not None and config.structure.blocks > 0
    if sc.kind == "explicit" and sc.values is not None and on_this_machine and not removes_blocks:
        depth = _local_depth(config.model)
        if depth is not None and len(sc.values) != depth:
            problems.append(
                Problem("schedule.values", f"{len(sc.values)} values for a model of {depth} blocks", "invalid_schedule")
            )
    return problems


def _local_depth(ref: str) -> int | None:
    """num_hidden_layers of a local model's config.json, when it says."""
    if not is_local_model(ref):
        return None
    try:
        cfg = json.loads((Path(ref.removeprefix("file://")).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # reported by _model
    depth = cfg.get("num_hidden_layers") if isinstance(cfg, dict) else None
    return depth if isinstance(depth, int) else None
