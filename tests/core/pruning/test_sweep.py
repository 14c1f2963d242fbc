"""Sparsity sweeps: one run, several targets, each giving what a single-target run of it gives (same masks, same
perplexity), with the model, calibration and dense evaluation done once."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from safetensors.torch import load_file

from core.pruning.config import CalibrationConfig, EvalConfig, PruneConfig
from core.pruning.export import verify
from core.pruning.progress import Progress, RunFraction, planned_stages
from core.pruning.run import prune
from core.pruning.svgplot import Point, perplexity_plot


@pytest.fixture(autouse=True)
def one_thread():
    """These runs are small: on shared cores, one thread each is faster than oversubscribed ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(model: Path, text: Path, method: str, **target):
    return PruneConfig(
        model=str(model),
        method=method,
        calibration=CalibrationConfig(source=str(text), nsamples=8, seqlen=64),
        evaluation=EvalConfig(source=str(text), seqlen=64, max_windows=4, batch_size=4),
        **target,
    )


def _masks(d: Path) -> dict:
    return load_file(str(d / "masks.safetensors"))


@pytest.mark.parametrize(("method", "ratios"), [("wanda", [0.3, 0.6]), ("magnitude", [0.6]), ("sparsegpt", [0.6])])
def test_sweep_equals_single_runs(stories260k, text_dir, tmp_path, method, ratios):
    """Each target after the first starts from the restored dense weights: masks and perplexity are those of
    a single run of it, exactly (all three methods are deterministic on CPU)."""
    text = text_dir / "tinystories-valid.txt"
    pats = ["2:4"]
    only_masks = {"export": {"save_model": False}}  # what is compared: the masks, the metrics
    cfg = _config(
        stories260k, text, method, sparsities=ratios, patterns=pats, export_sparsities=ratios, export_patterns=pats,
        **only_masks,
    )  # fmt: skip
    seen: list[Progress] = []
    res = prune(cfg, tmp_path / "sweep", on_progress=seen.append)
    assert verify(tmp_path / "sweep") == []
    points = {str(p["target"]): p for p in res.metrics["sweep"]["points"]}
    targets = [(f"{x:g}", {"sparsity": x}, f"sparsity-{x:.2f}") for x in ratios] + [
        ("2:4", {"pattern": "2:4"}, "nm-2-4")
    ]
    assert list(points) == [t[0] for t in targets]
    for key, target, name in targets:
        single = prune(_config(stories260k, text, method, **target, **only_masks), tmp_path / name).metrics
        mine = json.loads((tmp_path / "sweep" / name / "metrics.json").read_text())
        assert points[key]["perplexity"] == single["perplexity"]["pruned"], key  # exactly: same computation
        assert mine["perplexity"] == single["perplexity"] and mine["layers"] == single["layers"]
        assert points[key]["achieved_sparsity"] == single["achieved_sparsity"]
        a, b = _masks(tmp_path / "sweep" / name), _masks(tmp_path / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), key
        assert res.metrics["perplexity"]["dense"] == single["perplexity"]["dense"]
    # the fraction of the run only moves forward through all targets, and each target's steps are named
    frac = RunFraction(planned_stages(cfg))
    values = [frac(p) for p in seen]
    assert values == sorted(values) and values[-1] == pytest.approx(frac.start["export"])
    blocks = [p for p in seen if p.stage == "prune" and p.block is not None]
    n = len(targets)
    assert blocks[-1].block + 1 == blocks[-1].total_blocks == n * 5
    assert blocks[0].message.startswith(f"prune {targets[0][0]} (1/{n})")
    assert any(p.stage == f"evaluate 2:4 ({n}/{n})" for p in seen)


def test_only_marked_targets_are_exported_and_the_plot_is_written(stories260k, text_dir, tmp_path):
    cfg = _config(
        stories260k,
        text_dir / "tinystories-valid.txt",
        "wanda",
        sparsities=[0.4, 0.6],
        patterns=["2:4", "4:8"],
        export_sparsities=[0.6],
        export_patterns=["4:8"],
    )
    res = prune(cfg, tmp_path / "out")
    out = tmp_path / "out"
    names = {f.name for f in res.files}
    for d, exported in [("sparsity-0.40", False), ("sparsity-0.60", True), ("nm-2-4", False), ("nm-4-8", True)]:
        assert f"{d}/metrics.json" in names
        assert (f"{d}/model.safetensors" in names) is exported, d
        assert (f"{d}/masks.safetensors" in names) is exported, d
    points = res.metrics["sweep"]["points"]
    assert [p["exported"] for p in points] == [False, True, False, True]
    assert {"target", "sparsity", "pattern", "perplexity", "tasks", "exported", "wall_s"} <= set(points[0])
    svg = (out / "sweep.svg").read_text()
    assert svg.startswith("<svg") and svg.count('class="point"') == 4 and 'class="dense"' in svg
    assert {f.kind for f in res.files if f.name == "sweep.svg"} == {"plot"}
    # the exported target's directory is a model transformers loads
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(out / "nm-4-8")
    assert m is not None


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"sparsities": [0.3], "sparsity": 0.5}, "sparsity"),
        ({"patterns": ["2:4"], "pattern": "4:8"}, "pattern"),
        ({"sparsities": [0.3], "structure": {"heads": 0.25}}, "structure"),
        ({"sparsities": [0.3, 0.3]}, "sparsities"),
        ({"sparsities": [1.2]}, "sparsities"),
        ({"sparsities": []}, "sparsities"),
        ({"sparsities": [i / 20 for i in range(17)]}, "sparsities"),
        ({"sparsities": [i / 20 for i in range(13)], "patterns": ["2:4"]}, "sparsities"),
        ({"sparsities": [0.5], "patterns": ["2:4", "1:4", "3:8", "1:8", "1:16"]}, "patterns"),
        ({"patterns": ["2:4", "x"]}, "patterns"),
        ({"sparsities": [0.3], "export_sparsities": [0.4]}, "export_sparsities"),
        ({"patterns": ["2:4"], "export_patterns": ["4:8"]}, "export_patterns"),
        ({"sparsity": 0.3, "export_sparsities": [0.3]}, "export_sparsities"),
        ({"patterns": ["2:4"], "schedule": {"kind": "linear", "first": 0.1, "last": 0.5}}, "patterns"),
    ],
)
def test_sweep_validation_names_the_field(given, field):
    with pytest.raises(ValidationError) as e:
        PruneConfig(model="m", **given)
    assert [err["loc"][0] for err in e.value.errors()] == [field], e.value.errors()


def test_sweep_targets_are_single_configs():
    cfg = PruneConfig(model="m", sparsities=[0.7, 0.3], patterns=["2:4", "4:8"], export_patterns=["4:8"])
    t = cfg.sweep_targets()
    assert [(c.sparsity, c.pattern, c.export.save_model) for c in t] == [
        (0.7, None, False),
        (0.3, None, False),
        (None, "2:4", False),
        (None, "4:8", True),
    ]
    assert all(not c.is_sweep for c in t)
    owl = PruneConfig(model="m", sparsities=[0.5, 0.6], schedule={"kind": "owl"})
    assert [c.schedule.kind for c in owl.sweep_targets()] == ["owl", "owl"]


def test_svg_plot_escapes_and_skips_missing_points():
    svg = perplexity_plot(
        [Point(0.3, 6.0, "0.3"), Point(0.5, float("nan"), "0.5"), Point(0.5, 12.0, "<2:4>", joined=False)],
        dense=5.0,
        title="a <b>",
    )
    assert svg.count('class="point"') == 2 and "<b>" not in svg and "&lt;2:4&gt;" in svg
    assert 'class="curve"' not in svg  # a line needs two joined points


def test_a_sweep_without_evaluation_and_a_stop_between_targets(stories260k, text_dir, tmp_path):
    from core.pruning.errors import Cancelled

    cal = CalibrationConfig(source=str(text_dir / "tinystories-valid.txt"), nsamples=4, seqlen=64)
    cfg = PruneConfig(model=str(stories260k), method="magnitude", sparsities=[0.2, 0.4], calibration=cal)
    res = prune(cfg, tmp_path / "plain")
    assert [p["perplexity"] for p in res.metrics["sweep"]["points"]] == [None, None]
    assert res.metrics["sweep"]["dense_perplexity"] is None and (tmp_path / "plain" / "sweep.svg").is_file()

    seen: list[str] = []
    with pytest.raises(Cancelled):
        prune(
            cfg, tmp_path / "stopped", on_progress=lambda p: seen.append(p.stage), should_stop=lambda: "prune" in seen
        )
    assert not (tmp_path / "stopped").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]  # no scratch or staging left beside it


def test_owl_ratios_and_task_scores_are_shared_and_each_target_equals_its_single_run(stories260k, text_dir, tmp_path):
    """OWL's outlier ratios and the dense task scores come from the dense model once; each ratio gets its own
    block schedule from them, and its task scores, as a single OWL run of it does."""
    from core.pruning import tasks

    if not tasks.installed():
        pytest.skip("lm-eval is not installed")
    text = str(text_dir / "tinystories-valid.txt")
    base = {
        "model": str(stories260k),
        "method": "wanda",
        "schedule": {"kind": "owl", "owl_lambda": 0.1},
        "calibration": {"source": text, "nsamples": 8, "seqlen": 64},
        "evaluation": {"tasks": ["tinystories_continuation"], "limit": 8, "batch_size": 8},
        "export": {"save_model": False},
    }
    res = prune(PruneConfig.model_validate({**base, "sparsities": [0.5, 0.6], "export_sparsities": [0.5, 0.6]}),
                tmp_path / "sweep")  # fmt: skip
    points = res.metrics["sweep"]["points"]
    assert res.metrics["sweep"]["dense_tasks"]["tinystories_continuation"]["acc"] > 0
    for p in points:
        single = prune(PruneConfig.model_validate({**base, "sparsity": p["target"]}), tmp_path / p["dir"]).metrics
        assert p["block_sparsity"] == single["block_sparsity"] and len(set(p["block_sparsity"])) > 1
        assert p["tasks"] == single["tasks"]["pruned"]
        assert res.metrics["tasks"]["dense"] == single["tasks"]["dense"]
        a, b = _masks(tmp_path / "sweep" / p["dir"]), _masks(tmp_path / p["dir"])
        assert all(a[k].equal(b[k]) for k in a)
