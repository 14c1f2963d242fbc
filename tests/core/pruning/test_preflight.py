"""Inputs checked before the model loads: every problem at once, with its field."""

import json

import pytest

from core.pruning import export, models, preflight
from core.pruning.config import PruneConfig
from core.pruning.run import prune


@pytest.fixture
def model_dir(tmp_path):
    """A directory that passes for a model (config.json) but that no loader could load."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    return d


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "cal.txt"
    p.write_text("some calibration text " * 20)
    return p


def config(model, **kw):
    return PruneConfig(model=str(model), sparsity=0.5, **kw)


def fields(problems):
    return [p.field for p in problems]


def test_a_valid_config_has_no_problems(model_dir, text, tmp_path):
    cfg = config(model_dir, calibration={"source": str(text)}, evaluation={"source": str(text)})
    assert preflight.check(cfg, tmp_path / "new" / "out") == []


def test_missing_calibration_file_is_reported_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(models, "load", lambda *a, **k: loads.append(a) or pytest.fail("the model was loaded"))
    cfg = config(model_dir, calibration={"source": str(tmp_path / "typo.txt")})
    with pytest.raises(preflight.PreflightError) as e:
        prune(cfg, tmp_path / "out")
    assert loads == [] and not (tmp_path / "out").exists()
    assert e.value.code == "calibration_error" and "typo.txt" in str(e.value)
    assert fields(e.value.problems) == ["calibration.source"]


def test_every_problem_is_listed_with_its_field(tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\nnot json\n')
    binary = tmp_path / "eval.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    (tmp_path / "model").mkdir()
    cfg = config(tmp_path / "model", calibration={"source": str(bad_jsonl)}, evaluation={"source": str(binary)})
    problems = preflight.check(cfg, tmp_path / "out")
    assert fields(problems) == ["model", "calibration.source", "evaluation.source", "out"]
    assert [p.code for p in problems] == ["invalid_model", "calibration_error", "evaluation_error", "output_not_empty"]
    assert "line 2" in problems[1].message and "UTF-8" in problems[2].message
    message = preflight.describe(problems)
    assert message.startswith("4 problems") and all(f"  {f}: " in message for f in fields(problems))


def test_a_missing_model_directory_and_token_ids_given_for_evaluation(tmp_path):
    ids = tmp_path / "ids.npy"
    ids.write_bytes(b"")
    problems = preflight.check(config(tmp_path / "nope", evaluation={"source": str(ids)}))
    assert [(p.field, p.code) for p in problems] == [
        ("model", "model_not_found"),
        ("evaluation.source", "evaluation_error"),
    ]


def test_named_sets_need_the_datasets_extra(model_dir, monkeypatch):
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda n: None if n == "datasets" else real(n))
    [p] = preflight.check(config(model_dir, calibration={"source": "wikitext2"}))
    assert p.field == "calibration.source" and "datasets" in p.message


def test_uploaded_sets_are_resolved_by_the_caller_or_skipped(model_dir, tmp_path):
    cfg = config(model_dir, calibration={"source": "uploaded:cal_1"})
    assert preflight.check(cfg) == []
    empty = tmp_path / "empty.txt"
    empty.write_text("  ")
    seen = []
    [p] = preflight.check(cfg, resolve_upload=lambda ref: seen.append(ref) or empty)
    assert seen == ["cal_1"] and p.field == "calibration.source" and "empty" in p.message


def test_a_service_can_leave_the_model_to_the_machine_that_runs_it(tmp_path, text):
    cfg = config(tmp_path / "elsewhere", calibration={"source": str(text)}, device="cuda:0")
    assert preflight.check(cfg, on_this_machine=False) == []


def test_option_combinations(model_dir, text):
    cal = {"source": str(text)}
    [p] = preflight.check(PruneConfig(model=str(model_dir), pattern="2:4", wanda_alpha_search=True, calibration=cal))
    assert p.field == "method_options.wanda_alpha_search" and "N:M" in p.message
    explicit = {"kind": "explicit", "values": [0.5, 0.5]}
    [p] = preflight.check(config(model_dir, schedule=explicit, calibration=cal))
    assert p.field == "schedule.values" and "3 blocks" in p.message
    assert preflight.check(config(model_dir, schedule={**explicit, "values": [0.5] * 3}, calibration=cal)) == []
    removes_a_block = {"blocks": 0.34}  # the model prunes with fewer blocks than its config.json says
    assert preflight.check(config(model_dir, schedule=explicit, structure=removes_a_block, calibration=cal)) == []


def test_output_directory_problems(tmp_path):
    (tmp_path / "file").write_text("x")
    [p] = preflight.out_dir_problems(tmp_path / "file" / "out")
    assert p.field == preflight.OUT and "not a writable directory" in p.message
    assert preflight.out_dir_problems(tmp_path / "a" / "b") == []
    with pytest.raises(FileExistsError):
        export.check_out_dir(tmp_path / "file")


def test_an_output_problem_is_still_a_file_exists_error(model_dir, tmp_path, text):
    with pytest.raises(FileExistsError) as e:
        preflight.raise_on_problems(config(model_dir, calibration={"source": str(text)}), tmp_path)
    assert isinstance(e.value, preflight.PreflightError) and e.value.code == "output_not_empty"
