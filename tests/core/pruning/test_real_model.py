"""The real trained stories260K model (../shared): the methods rank as the papers report."""

import logging

import pytest

from core.pruning.config import CalibrationConfig, EvalConfig, PruneConfig
from core.pruning.run import prune

log = logging.getLogger("secateurs.tests")


@pytest.mark.slow
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50%", "2:4"])
def test_perplexity_dense_lt_sparsegpt_le_wanda_lt_magnitude(stories260k, text_dir, tmp_path, target, capsys):
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        cfg = PruneConfig(
            model=str(stories260k),
            method=method,
            **target,
            calibration=CalibrationConfig(source=str(text_dir / "tinystories-valid.txt"), nsamples=64, seqlen=256),
            evaluation=EvalConfig(
                source=str(text_dir / "wikitext-2-test.txt"), seqlen=256, max_windows=64, batch_size=16
            ),
        )
        m = prune(cfg, tmp_path / method).metrics
        ppl["dense"] = m["perplexity"]["dense"]
        ppl[method] = m["perplexity"]["pruned"]
        assert m["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    line = f"stories260k {list(target.values())[0]}: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
    log.warning(line)
    with capsys.disabled():
        print(f"\n[perplexity, wikitext-2-test 64x256, calib tinystories 64x256] {line}")
    assert ppl["dense"] < ppl["sparsegpt"] <= ppl["wanda"] < ppl["magnitude"], ppl
