"""Streaming pruned blocks to disk and resuming a run at its first unfinished block (issue 22): the memory
held does not grow with depth; a run stopped and resumed gives the very masks and weights of an uninterrupted
one; a corrupt block is redone; a changed config starts over."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.pruning.checkpoints import ResumeSpec
from core.pruning.config import CalibrationConfig, PruneConfig
from core.pruning.errors import Cancelled
from core.pruning.progress import Progress
from core.pruning.run import prune
from core.pruning.streaming import write_safetensors
from tests.conftest import ROOT
from tests.fixtures import tiny_models

BLOCKS = 8


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:  # noqa: ANN001
    from transformers import LlamaConfig, LlamaForCausalLM

    where = tmp_path_factory.mktemp("deep")
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tiny_models.VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(where, safe_serialization=True)
    tiny_models.tokenizer().save_pretrained(where)
    (where / "calibration.txt").write_text(tiny_models.CORPUS * 3)
    return where


def config(model: Path, method: str, sparsity: float = 0.5) -> PruneConfig:
    return PruneConfig(
        model=str(model),
        method=method,
        sparsity=sparsity,
        calibration=CalibrationConfig(source=str(model / "calibration.txt"), nsamples=8, seqlen=32),
    )


def tensors(out: Path) -> dict[str, torch.Tensor]:
    got = {f"mask/{k}": v for k, v in load_file(str(out / "masks.safetensors")).items()}
    for f in sorted(out.glob("model*.safetensors")):
        got.update(load_file(str(f)))
    return got


def stopped_after(block: int):  # noqa: ANN201
    """on_progress and should_stop that stop the run once `block` (0-based) is finished."""
    state = {"stop": False}

    def on_progress(p: Progress) -> None:
        if p.stage == "prune" and p.block == block:
            state["stop"] = True

    return on_progress, lambda: state["stop"]


def run_stopped(cfg: PruneConfig, out: Path, spec: ResumeSpec, block: int) -> None:
    on_progress, should_stop = stopped_after(block)
    with pytest.raises(Cancelled):
        prune(cfg, out, on_progress=on_progress, should_stop=should_stop, resume=spec)
    assert not out.exists()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("method", "save_inputs"),
    [("magnitude", None), ("wanda", True), ("wanda", False), ("sparsegpt", True), ("sparsegpt", False)],
)
def test_stopped_and_resumed_equals_uninterrupted(deep: Path, tmp_path: Path, method: str, save_inputs: bool):
    cfg = config(deep, method)
    whole = prune(cfg, tmp_path / "whole")
    notes: list[str] = []
    spec = ResumeSpec(tmp_path / "ck", note=notes.append, save_inputs=save_inputs)
    run_stopped(cfg, tmp_path / "resumed", spec, block=3)
    records = sorted(p.name for p in (tmp_path / "ck").glob("block-*.json"))
    assert records == [f"block-{i:05d}.json" for i in range(4)]
    blocks_seen: list[int] = []
    resumed = prune(
        cfg,
        tmp_path / "resumed",
        on_progress=lambda p: blocks_seen.append(p.block) if p.stage == "prune" and p.block is not None else None,
        resume=spec,
    )
    assert any(n.startswith(f"resumed at block 5 of {BLOCKS} (4 finished blocks restored") for n in notes), notes
    assert ("rebuilding" in notes[-1]) == (save_inputs is False)
    assert blocks_seen == list(range(BLOCKS))
    assert_same(tensors(whole.out_dir), tensors(resumed.out_dir))  # bit-exact, SparseGPT included
    assert [r["name"] for r in resumed.metrics["layers"]] == [r["name"] for r in whole.metrics["layers"]]
    assert resumed.metrics["achieved_sparsity"] == whole.metrics["achieved_sparsity"]


def test_the_output_loads_and_matches_its_manifest(deep: Path, tmp_path: Path):
    import transformers

    from core.pruning.export import verify

    res = prune(config(deep, "wanda"), tmp_path / "out")
    assert verify(res.out_dir) == []
    m = transformers.LlamaForCausalLM.from_pretrained(res.out_dir).eval()
    w = m.model.layers[5].mlp.down_proj.weight
    assert abs((w == 0).float().mean().item() - 0.5) < 0.01
    out = m(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(out).all()


def test_corrupt_block_is_detected_and_redone(deep: Path, tmp_path: Path):
    cfg = config(deep, "wanda")
    whole = prune(cfg, tmp_path / "whole")
    notes: list[str] = []
    spec = ResumeSpec(tmp_path / "ck", note=notes.append)
    run_stopped(cfg, tmp_path / "out", spec, block=5)
    shard = tmp_path / "ck" / "block-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the weights: the file still parses
    shard.write_bytes(bytes(data))
    res = prune(cfg, tmp_path / "out", resume=spec)
    assert "the checkpoint of block 3 is corrupt (sha256 mismatch): redoing it" in notes
    assert any(n.startswith(f"resumed at block 3 of {BLOCKS} (2 finished blocks restored, rebuilding") for n in notes)
    assert_same(tensors(whole.out_dir), tensors(res.out_dir))


def test_a_changed_config_does_not_resume(deep: Path, tmp_path: Path):
    notes: list[str] = []
    spec = ResumeSpec(tmp_path / "ck", note=notes.append)
    run_stopped(config(deep, "wanda", 0.5), tmp_path / "out", spec, block=3)
    changed = config(deep, "wanda", 0.6)
    res = prune(changed, tmp_path / "out", resume=spec)
    assert any("another configuration" in n and "starting over" in n for n in notes), notes
    assert not any(n.startswith("resumed") for n in notes)
    assert_same(tensors(prune(changed, tmp_path / "fresh").out_dir), tensors(res.out_dir))
    assert abs(res.metrics["achieved_sparsity"] - 0.6) < 0.01


def test_write_safetensors_is_read_by_safetensors(tmp_path: Path):
    ts = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2).to(torch.bfloat16),
        "d": torch.tensor([True, False]),
        "e": torch.zeros(0, 4),
        "f": torch.randn(4, 6).t(),  # not contiguous
    }
    sha = write_safetensors(tmp_path / "x.safetensors", ts, {"k": "v"})
    from core.hashing import sha256_file

    assert sha == sha256_file(tmp_path / "x.safetensors")
    assert_same(ts, load_file(str(tmp_path / "x.safetensors")))


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from core.pruning.config import CalibrationConfig, PruneConfig
    from core.pruning.run import prune
    from tests.fixtures import tiny_models

    where, blocks = sys.argv[1], int(sys.argv[2])
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=blocks, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=tiny_models.VOCAB, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(where, safe_serialization=True, max_shard_size="64MB")
    tiny_models.tokenizer().save_pretrained(where)
    open(where + "/calibration.txt", "w").write(tiny_models.CORPUS * 3)
    del cfg
    import gc; gc.collect()

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    per_block = []
    def on_progress(p):
        if p.stage == "prune" and p.block is not None:
            per_block.append(rss())
    c = PruneConfig(model=where, method="wanda", sparsity=0.5,
                    calibration=CalibrationConfig(source=where + "/calibration.txt", nsamples=4, seqlen=32))
    start = rss()
    res = prune(c, where + "/out", on_progress=on_progress)
    print(json.dumps({"start": start, "per_block": per_block, "end": rss(),
                      "peak": res.metrics["memory"]["peak_rss_bytes"]}))
    """
)


def test_memory_does_not_grow_with_depth(tmp_path: Path):
    """A model of 24 blocks of 12.6 MB each (300 MB): pruned, each block's weights would stay in memory; streamed,
    the process's memory after each block is flat."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "m"), "24"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    block = (4 * 512 * 512 + 3 * 512 * 1536) * 4  # 12.6 MB of fp32 weights
    rss = got["per_block"]
    assert len(rss) == 24
    growth = (rss[-1] - rss[3]) / (len(rss) - 4)  # per block, after the first blocks warmed the allocator
    assert growth < 0.1 * block, (growth, rss)
    assert max(rss) - rss[3] < 2 * block, rss  # held whole, the 20 later blocks would add 250 MB
