"""Run one pruning job through vllm-project's llm-compressor (`oneshot`, sequential pipeline).

Runs inside the llm-compressor virtualenv (see bench/README.md), as a subprocess of
`prune_bench.py`:

    .venv-llmc/bin/python bench/llmc_runner.py SPEC.json RESULT.json

SPEC keys: model (dir), tokens (.pt int64 [nsamples, seqlen]), method (sparsegpt|wanda),
sparsity (float), mask_structure ("0:0" or "N:M"), threads, dtype (default float32),
batch_size, save (path of a safetensors file for the pruned weights, or null).

The timed section is the `oneshot(...)` call alone, given the already loaded model and the
already tokenised calibration windows; loading and saving are timed separately.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def main() -> None:
    spec, out = C.read_spec(sys.argv)
    clock = C.Clock()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    C.set_threads(int(spec["threads"]))
    clock.lap("import")

    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=getattr(torch, spec.get("dtype", "float32"))
    )
    model.eval()
    tokens = C.load_tokens(spec["tokens"])
    ns, sl = tokens.shape
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    clock.lap("load")

    common = {
        "sparsity": float(spec["sparsity"]),
        "mask_structure": spec["mask_structure"],
        "targets": ["Linear"],
        "ignore": ["re:.*lm_head"],
    }
    if spec["method"] == "sparsegpt":
        modifier = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
    elif spec["method"] == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        raise SystemExit(f"llm-compressor has no {spec['method']!r} modifier in this bench")

    t, c = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        dataset=ds,
        recipe=[modifier],
        num_calibration_samples=ns,
        max_seq_length=sl,
        shuffle_calibration_samples=False,
        batch_size=int(spec.get("batch_size", 1)),
        pipeline="sequential",
        sequential_offload_device="cpu",
    )
    prune_s = time.perf_counter() - t
    prune_cpu_s = time.process_time() - c
    clock.lap("prune")
    rss_after_prune = C.rss_bytes()

    stats = C.block_linear_stats(model)
    if spec.get("save"):
        from safetensors.torch import save_model

        save_model(model, spec["save"])
    clock.lap("save")

    import compressed_tensors

    C.write_result(
        out,
        {
            "tool": "llmcompressor",
            "prune_s": prune_s,
            "prune_cpu_s": prune_cpu_s,
            "stages": clock.stages,
            "rss_at": clock.rss,
            "rss_after_prune": rss_after_prune,
            "peak_rss_self": C.peak_rss_self_bytes(),
            "stats": stats,
            "versions": {
                "llmcompressor": llmcompressor.__version__,
                "compressed_tensors": compressed_tensors.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
