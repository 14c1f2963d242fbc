"""A new method is one file: written here, registered by importing it, it is a `method` PruneConfig accepts,
its option is checked and reaches the method, the engine runs it, and the CLI has a flag for its option."""

import json
import os
import runpy
import subprocess
import sys

import pytest
from pydantic import ValidationError

from cli import flags
from core.pruning.config import CalibrationConfig, PruneConfig
from core.pruning.methods import REGISTRY
from core.pruning.run import prune

METHOD_FILE = """
import torch
from pydantic import Field

from core.pruning import patterns
from core.pruning.methods.base import Method, MethodOptions, Pruned, Stats, Target


class SeededRandom(Method):
    name = "seeded_random"
    needs_inputs = False
    masks_only = True

    class Options(MethodOptions):
        random_seed: int = Field(0, ge=0, description="seed of the random scores")

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        scores = torch.rand(w.shape, generator=torch.Generator().manual_seed(self.options.random_seed))
        mask = patterns.per_row_mask(lambda rows: scores[rows], w.shape, w.device, target.sparsity, target.nm)
        return Pruned(w.masked_fill_(mask, 0), mask)
"""


@pytest.fixture
def method_file(tmp_path):
    path = tmp_path / "seeded_random.py"
    path.write_text(METHOD_FILE)
    runpy.run_path(str(path))
    yield path
    del REGISTRY["seeded_random"]


def config(model, **kw):
    cal = CalibrationConfig(source=str(model / "calibration.txt"), nsamples=4, seqlen=32)
    return PruneConfig(model=str(model), method="seeded_random", sparsity=0.5, calibration=cal, **kw)


def test_config_knows_the_method_and_checks_its_option(method_file, tmp_path):
    assert config(tmp_path).method_options == {"random_seed": 0}
    assert config(tmp_path, random_seed=3).method_options == {"random_seed": 3}  # flat, as every option can be
    assert "seeded_random" in PruneConfig.model_json_schema()["properties"]["method"]["enum"]
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        config(tmp_path, method_options={"random_seed": -1})
    with pytest.raises(ValidationError, match="a setting of seeded_random"):
        PruneConfig(model="m", method="wanda", sparsity=0.5, random_seed=3)


def test_the_engine_runs_it_with_its_option(method_file, tiny_model, tmp_path):
    model = tiny_model("llama")
    runs = {seed: prune(config(model, method_options={"random_seed": seed}), tmp_path / str(seed)) for seed in (1, 2)}
    for seed, r in runs.items():
        assert r.metrics["achieved_sparsity"] == pytest.approx(0.5)
        assert r.metrics["config"]["method_options"] == {"random_seed": seed}
    masks = [(tmp_path / str(seed) / "masks.safetensors").read_bytes() for seed in runs]
    assert masks[0] != masks[1]  # the option reached the method


def test_the_cli_has_a_flag_for_its_option(method_file, tiny_model, tmp_path):
    flag = next(f for f in flags.config_flags() if f.param == "random_seed")
    assert flag.path == ("random_seed",) and "seed of the random scores" in flag.help and "seeded_random" in flag.help
    assert flags.config_input(flags.config_flags(), {"random_seed": 5, "method": "seeded_random"}) == {
        "random_seed": 5,
        "method": "seeded_random",
    }

    def cli(*args):  # the method file is imported before the CLI builds its flags, as a plugin would be
        code = f"import runpy; runpy.run_path({str(method_file)!r}); from cli.app import main; main()"
        return subprocess.run(
            [sys.executable, "-c", code, "prune", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "200"},
        )

    assert "--random-seed" in cli("--help").stdout
    model = tiny_model("llama")
    r = cli(
        "--model",
        model,
        "--method",
        "seeded_random",
        "--random-seed",
        7,
        "--sparsity",
        0.5,
        "--calibration",
        model / "calibration.txt",
        "--nsamples",
        4,
        "--seqlen",
        32,
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["method_options"] == {"random_seed": 7}
    r = cli("--model", model, "--method", "wanda", "--random-seed", 7, "--sparsity", 0.5, "--out", tmp_path / "w")
    assert r.returncode == 2 and "--random-seed: a setting of seeded_random" in r.stderr
