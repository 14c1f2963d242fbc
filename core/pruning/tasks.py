"""Downstream tasks through lm-evaluation-harness (`evaluation.tasks`): finding them, checking before any model
loads that their data can be had, and scoring the in-memory model with lm-eval's own Python API.

Tasks are found by name among lm-eval's built-in tasks, the tasks this project ships (`lm_tasks/`, e.g.
`tinystories_continuation`) and the YAML files under `evaluation.task_paths`. Each requested name is run with
its own `lm_eval.simple_evaluate` call (lm-eval's defaults: seeds, bootstrap iterations), on an `HFLM` wrapping
the model object the run holds (no second load from disk), so the scores equal those of `simple_evaluate` on the
exported directory.

Checks (`problems`): on any machine, the task paths exist and their YAML files parse (without running the
`!function` code they may name) and every name is found; on the machine that runs the job, also that every
task builds, which loads its data (a missing data file, an unreachable hub): `task_unavailable`."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.pruning.errors import EvaluationError
from core.pruning.progress import Progress, ProgressFn, StopFn

if TYPE_CHECKING:
    from torch import nn

    from core.pruning.config import EvalConfig
    from core.pruning.preflight import Problem

SHIPPED_TASKS = Path(__file__).with_name("lm_tasks")
INSTALL_HINT = "pip install 'secateurs[lmeval]'"
UNKNOWN, UNAVAILABLE, INVALID = "unknown_task", "task_unavailable", "invalid_task"


class TaskUnavailableError(EvaluationError):
    code = UNAVAILABLE


def installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's info and warning logging off while it runs (the caller reports progress and errors)."""
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _include(task_paths: list[str]) -> list[str]:
    return [str(SHIPPED_TASKS), *(str(Path(p).expanduser()) for p in task_paths)]


@functools.lru_cache(maxsize=8)
def _manager_with_defaults(include: tuple[str, ...]) -> Any:
    """Indexing lm-eval's ~14,000 built-in task files takes seconds: once per process and set of paths."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include), include_defaults=True)


def manager(task_paths: list[str], names: list[str]) -> Any:
    """A TaskManager that knows `names`: the shipped tasks and `task_paths` alone when they hold every name (fast),
    else with lm-eval's built-in tasks too."""
    from lm_eval.tasks import TaskManager

    include = _include(task_paths)
    tm = TaskManager(include_path=include, include_defaults=False)
    if all(n in tm.all_tasks for n in names):
        return tm
    return _manager_with_defaults(tuple(include))


def _yaml_problems(task_paths: list[str]) -> list[Problem]:
    from lm_eval.tasks._yaml_loader import load_yaml

    from core.pruning.preflight import Problem

    problems = []
    for i, raw in enumerate(task_paths):
        root = Path(raw).expanduser()
        field = f"evaluation.task_paths.{i}"
        if not root.is_dir():
            problems.append(Problem(field, f"{raw} is not a directory", INVALID))
            continue
        for path in sorted(root.glob("**/*.yaml")):
            try:
                cfg = load_yaml(path, resolve_func=False)  # parses only: `!function` code is not imported here
            except Exception as e:
                problems.append(Problem(field, f"{path}: not a task file lm-eval can read: {_short(e)}", INVALID))
                continue
            if not isinstance(cfg, dict) or not ({"task", "group", "class", "include"} & set(cfg)):
                problems.append(Problem(field, f"{path}: names no task or group", INVALID))
    return problems


# (names, paths) whose tasks built on this machine in this process: a second check (the CLI's, then the run's)
# does not load their data again
_BUILT: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()


def problems(ev: EvalConfig | None, *, on_this_machine: bool) -> list[Problem]:
    """What stands in the way of running `ev.tasks`; see the module's docstring."""
    from core.pruning.preflight import Problem

    if ev is None or not ev.tasks:
        return []
    if not installed():
        if not on_this_machine:
            return []  # the worker's machine has its own packages
        return [Problem("evaluation.tasks", f"lm-eval tasks need the lm-eval package ({INSTALL_HINT})", UNAVAILABLE)]
    found = _yaml_problems(ev.task_paths)
    if found:
        return found
    with _quiet():
        tm = manager(ev.task_paths, ev.tasks)
        unknown = [n for n in ev.tasks if n not in tm.all_tasks]
        if unknown:
            return [
                Problem(
                    "evaluation.tasks",
                    f"unknown task {n!r}: not among lm-eval {lm_eval_version()}'s tasks, the shipped tasks "
                    f"({', '.join(shipped_names())}) or the YAML files under task_paths",
                    UNKNOWN,
                )
                for n in unknown
            ]
        key = (tuple(ev.tasks), tuple(ev.task_paths))
        if not on_this_machine or key in _BUILT:
            return []
        for name in ev.tasks:
            try:
                tm.load([name])
            except Exception as e:
                found.append(
                    Problem("evaluation.tasks", f"task {name!r}: its data cannot be had: {_short(e)}", UNAVAILABLE)
                )
    if not found:
        _BUILT.add(key)
    return found


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_TASKS.glob("*/*.yaml"))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's `metric,filter` keys as `metric` (filter `none`) or `metric,filter`; stderr 'N/A' → None."""
    out: dict[str, float | None] = {}
    for key, value in entry.items():
        metric, sep, filt = key.partition(",")
        if not sep:
            continue  # alias, name, sample_len
        name = metric if filt == "none" else key
        if isinstance(value, bool) or not isinstance(value, int | float):
            out[name] = None
        else:
            out[name] = float(value) if math.isfinite(value) else None
    return out


class TaskRun:
    """The tasks of one run: what it records besides the scores (`protocol()`), and `score(model)` per model."""

    def __init__(self, ev: EvalConfig):
        assert ev.tasks
        self.ev, self.names = ev, list(ev.tasks)
        self.versions: dict[str, Any] = {}
        self.samples: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        return {
            "lm_eval_version": lm_eval_version(),
            "requested": self.names,
            "task_paths": self.ev.task_paths,
            "num_fewshot": self.ev.num_fewshot,
            "limit": self.ev.limit,
            "batch_size": self.ev.batch_size,
            "versions": self.versions,
            "samples": self.samples,
        }

    def score(
        self, model: nn.Module, tokenizer: Any, stage: str, on_progress: ProgressFn, should_stop: StopFn
    ) -> dict[str, dict[str, float | None]]:
        """{task: {metric: value, metric_stderr: value}} for every task (and group) lm-eval reports, one
        requested name at a time: progress `stage` task j/M, and a stop between tasks."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        from core.pruning.errors import Cancelled

        scores: dict[str, dict[str, float | None]] = {}
        total = len(self.names)
        with _quiet():
            tm = manager(self.ev.task_paths, self.names)
            # a copy: lm-eval sets a pad token on the tokenizer it is given, which would then be exported
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.ev.batch_size)
            for j, name in enumerate(self.names, 1):
                if should_stop():
                    raise Cancelled(f"stopped before lm-eval task {name}")
                on_progress(
                    Progress(
                        stage,
                        f"lm-eval task {j}/{total}: {name}",
                        block=j - 2 if j > 1 else None,
                        total_blocks=total,
                        data={"task": name, "task_index": j, "tasks": total},
                    )
                )
                try:
                    res = simple_evaluate(
                        model=lm,
                        tasks=[name],
                        task_manager=tm,
                        num_fewshot=self.ev.num_fewshot,
                        limit=self.ev.limit,
                        batch_size=self.ev.batch_size,
                        log_samples=False,
                    )
                except (OSError, ConnectionError) as e:  # data that was there at the check and is gone now
                    raise TaskUnavailableError(f"task {name!r}: its data cannot be had: {_short(e)}") from e
                assert res is not None  # None only on non-zero ranks of a distributed run
                for task, entry in res["results"].items():
                    scores[task] = _metrics(entry)
                self.versions.update({k: v for k, v in res.get("versions", {}).items()})
                self.samples.update({k: v.get("effective") for k, v in res.get("n-samples", {}).items()})
            on_progress(
                Progress(
                    stage, f"lm-eval: {total} task(s) done", block=total - 1, total_blocks=total, data={"tasks": total}
                )
            )
        return scores
