"""Main-environment worker of the bench: perplexity of a (pruned) model, or the runtime baseline.

    python bench/_eval_runner.py SPEC.json RESULT.json

mode "eval": load `model` (a directory transformers loads), optionally overwrite its
weights with the safetensors file `weights` (how llm-compressor's pruned weights come back),
then score the windows in `eval_tokens` with `_common.perplexity`. Both tools' outputs go
through this same code, on the same windows.

mode "baseline": the runtime baseline of the memory target: RSS after importing torch,
transformers and the engine (`core.pruning.run`) and loading the dense model on the CPU, every
weight read once (so memory-mapped weights are resident).
Also reports the model's largest decoder block in bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import _common as C


def _blocks(model):
    """The repeated decoder blocks: the longest ModuleList in the model."""
    import torch

    best = None
    for _, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    return list(best) if best is not None else []


def main() -> None:
    spec, out = C.read_spec(sys.argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    clock = C.Clock()
    import torch
    import transformers

    rss_python_torch_tf = C.rss_bytes()
    engine_imported = False
    if spec["mode"] == "baseline" and spec.get("import_engine", True):
        try:
            import core.pruning.run  # noqa: F401

            engine_imported = True
        except ImportError:
            pass
    C.set_threads(int(spec["threads"]))
    clock.lap("import")
    rss_imports = C.rss_bytes()

    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=getattr(torch, spec.get("dtype", "float32"))
    )
    model.eval()
    if spec.get("weights"):
        from safetensors.torch import load_model

        load_model(model, spec["weights"], strict=False)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
    clock.lap("load")

    res: dict = {"stages": clock.stages, "rss_at": clock.rss}
    if spec["mode"] == "baseline":
        # from_pretrained may leave safetensors weights memory-mapped and not yet read: touch every
        # parameter so that the whole model is resident, as it is once a pruning run has visited it.
        rss_lazy = C.rss_bytes()
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        baseline_rss = C.rss_bytes()
        # The runtime at work: one forward of one token starts the OpenMP threads and the kernels' workspaces
        # (5.5-6.6 MB on stories260k), which any pruning run has and the idle process above does not.
        with torch.no_grad():
            model(input_ids=torch.ones(1, 1, dtype=torch.long))
        baseline_rss_warm = C.rss_bytes()
        blocks = _blocks(model)
        block_bytes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
        res.update(
            rss_python_torch_transformers=rss_python_torch_tf,
            rss_imports=rss_imports,
            engine_imported=engine_imported,
            baseline_rss=baseline_rss,
            baseline_rss_warm=baseline_rss_warm,
            baseline_rss_lazy=rss_lazy,
            model_param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            model_params=sum(p.numel() for p in model.parameters()),
            n_blocks=len(blocks),
            largest_block_bytes=max(block_bytes) if block_bytes else 0,
            hidden_size=int(model.config.hidden_size),
            dtype_bytes=next(model.parameters()).element_size(),
        )
    else:
        windows = C.load_tokens(spec["eval_tokens"])
        res["ppl"] = C.perplexity(model, windows, batch_size=int(spec.get("batch_size", 8)))
        clock.lap("eval")
        res["stats"] = C.block_linear_stats(model)
    res["peak_rss_self"] = C.peak_rss_self_bytes()
    C.write_result(out, res)


if __name__ == "__main__":
    main()
