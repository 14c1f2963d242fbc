"""lm-eval tasks in a pruning run: the scores recorded equal lm-eval's own `simple_evaluate` on the exported
directory, progress names each task, and a task that cannot run stops the run before anything is pruned."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from core.pruning import preflight, tasks
from core.pruning.config import PruneConfig
from core.pruning.progress import Progress
from tests.conftest import require

LIMIT = 24
TASK = "tinystories_continuation"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    require(tasks.installed(), "lm-eval is not installed (pip install 'secateurs[lmeval]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def config(model: Path, text_dir: Path, **evaluation: Any) -> PruneConfig:
    return PruneConfig(
        model=str(model),
        method="wanda",
        sparsity=0.5,
        calibration={"source": str(text_dir / "tinystories-valid.txt"), "nsamples": 8, "seqlen": 128},
        evaluation={"tasks": [TASK], "limit": LIMIT, "batch_size": 16, **evaluation},
    )


@pytest.fixture(scope="module")
def pruned(stories260k: Path, text_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list]:
    from core.pruning.run import prune

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = tmp_path_factory.mktemp("lmeval") / "out"
    reports: list[Progress] = []
    result = prune(config(stories260k, text_dir), out, on_progress=reports.append)
    return out, result, reports


def test_scores_equal_simple_evaluate_on_the_exported_directory(pruned, stories260k: Path) -> None:  # noqa: ANN001
    import lm_eval
    from lm_eval.tasks import TaskManager

    out, result, _ = pruned
    recorded = json.loads((out / "metrics.json").read_text())["tasks"]
    assert recorded == result.metrics["tasks"]
    assert recorded["lm_eval_version"] == tasks.lm_eval_version()
    assert recorded["versions"] == {TASK: 1.0} and recorded["samples"] == {TASK: LIMIT}
    assert recorded["requested"] == [TASK] and recorded["limit"] == LIMIT
    for stage, model_dir in (("dense", stories260k), ("pruned", out)):
        theirs = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir)},
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(tasks.SHIPPED_TASKS), include_defaults=False),
            limit=LIMIT,
            batch_size=16,
            device="cpu",
            log_samples=False,
        )
        assert theirs is not None
        entry = theirs["results"][TASK]
        ours = recorded[stage][TASK]
        assert ours["acc"] == pytest.approx(entry["acc,none"], abs=1e-6), stage
        assert ours["acc_stderr"] == pytest.approx(entry["acc_stderr,none"], abs=1e-6), stage
    # the shipped task tells a trained model from its pruned self
    assert recorded["dense"][TASK]["acc"] > 0.6 > 0.25
    assert recorded["pruned"][TASK]["acc"] < recorded["dense"][TASK]["acc"]


def test_progress_names_each_task_in_both_evaluate_stages(pruned) -> None:  # noqa: ANN001
    _, _, reports = pruned
    for stage in ("evaluate_dense", "evaluate"):
        mine = [p for p in reports if p.stage == stage]
        assert mine[0].message == f"lm-eval task 1/1: {TASK}" and mine[0].data["task"] == TASK
        assert (mine[-1].block, mine[-1].total_blocks) == (0, 1)
    stages = [p.stage for p in reports]
    assert stages.index("evaluate_dense") < stages.index("prune") < stages.index("evaluate")


def test_the_exported_tokenizer_is_not_changed_by_lm_eval(pruned, stories260k: Path) -> None:  # noqa: ANN001
    out, _, _ = pruned
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg.get("pad_token") == json.loads((stories260k / "tokenizer_config.json").read_text()).get("pad_token")


def broken_task(root: Path, data: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "broken.yaml").write_text(
        "task: broken_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
    )
    return root


def test_a_missing_data_file_stops_the_run_before_the_model_loads(stories260k: Path, text_dir: Path, tmp_path: Path):
    from core.pruning.run import prune

    root = broken_task(tmp_path / "tasks", tmp_path / "gone.jsonl")
    reports: list[Progress] = []
    with pytest.raises(preflight.PreflightError) as e:
        prune(
            config(stories260k, text_dir, tasks=[TASK, "broken_local"], task_paths=[str(root)]),
            tmp_path / "out",
            on_progress=reports.append,
        )
    assert e.value.code == "task_unavailable"
    assert "broken_local" in str(e.value) and TASK not in str(e.value)
    assert reports == [] and not (tmp_path / "out").exists()


def test_unknown_names_and_unreadable_yaml_are_problems_on_any_machine(tmp_path: Path, stories260k: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "oops.yaml").write_text("task: [unclosed\n")
    cfg = PruneConfig(model=str(stories260k), sparsity=0.5, evaluation={"tasks": ["no_such_task_xyz"]})
    found = preflight.check(cfg, on_this_machine=False)
    assert [(p.field, p.code) for p in found] == [("evaluation.tasks", "unknown_task")]
    assert "no_such_task_xyz" in found[0].message
    cfg = PruneConfig(model=str(stories260k), sparsity=0.5, evaluation={"tasks": [TASK], "task_paths": [str(bad)]})
    found = preflight.check(cfg, on_this_machine=False)
    assert [(p.field, p.code) for p in found] == [("evaluation.task_paths.0", "invalid_task")]
    assert "oops.yaml" in found[0].message


def test_evaluation_config_tasks_only_means_no_perplexity() -> None:
    ev = PruneConfig(model="m", sparsity=0.5, evaluation={"tasks": "a, b,a"}).evaluation
    assert ev is not None and ev.tasks == ["a", "b"] and ev.source is None
    again = PruneConfig.model_validate(PruneConfig(model="m", sparsity=0.5, evaluation={"tasks": ["a"]}).model_dump())
    assert again.evaluation is not None and again.evaluation.source is None
    both = PruneConfig(model="m", sparsity=0.5, evaluation={"tasks": ["a"], "source": "wikitext2"}).evaluation
    assert both is not None and both.source == "wikitext2"
    assert PruneConfig(model="m", sparsity=0.5, evaluation={}).evaluation.source == "wikitext2"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="perplexity `source` or `tasks`"):
        PruneConfig(model="m", sparsity=0.5, evaluation={"source": None})
