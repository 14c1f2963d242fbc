"""What the papers' protocol costs in block forwards alone, before any pruning work (main environment).

    python bench/pass_floor.py MODEL_DIR TOKENS.pt [--threads 2] [--dtype float32] [--json RUN.json]

Every tool that follows the protocol (the Wanda and SparseGPT reference code, llm-compressor's sequential
pipeline, our engine) runs, per block, a statistics pass of the dense block over the calibration windows and
then a pass of the pruned block, whose outputs feed the next block. This script times those passes on the
dense model, through our engine's own capture and replay:

- full pass: the whole block over every window (what the reference code and llm-compressor run, twice);
- statistics pass: stopped once the last prunable layer has its input (what our engine runs; down_proj's
  product and the residual are skipped).

With --json (a prune_bench.py run on the same model, tokens, dtype and threads) it sets the measured
prune times beside the floor: our floor / llm-compressor's time is the smallest time ratio that any
implementation of the protocol could reach on this machine, whatever its pruning step costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import _common as C  # noqa: E402


def measure(model_dir: str, tokens_path: str, dtype: str) -> dict:
    import torch

    from core.pruning import models, walk
    from core.pruning.memory import reusing_freed_memory
    from core.pruning.run import TOKENS_PER_BATCH

    loaded = models.load(model_dir, dtype)
    model = loaded.model
    tokens = C.load_tokens(tokens_path)
    _, blocks = models.find_blocks(model)
    cpu = torch.device("cpu")
    # the allocator setting prune() runs under: without it every window's activations come from fresh pages
    with torch.no_grad(), reusing_freed_memory():
        inputs = walk.capture(model, blocks, tokens, cpu, max(1, TOKENS_PER_BATCH // tokens.shape[1]))
        rows = []
        for i, block in enumerate(blocks):
            layers = models.prunable_layers(block)
            models.own_weights(list(layers.values()))  # as the engine does: no first-touch page copies timed
            inputs.run(block, keep=False)  # warm: the first call of a shape pays its one-time set-up
            t = time.perf_counter()
            inputs.run(block, keep=False)
            full = time.perf_counter() - t
            t = time.perf_counter()
            inputs.collect(block, layers, lambda name, x: None)
            stats = time.perf_counter() - t
            rows.append({"block": i, "full_s": full, "stats_s": stats})
            inputs.advance(block)
    return {
        "calibration": list(tokens.shape),
        "blocks": rows,
        "full_pass_s": sum(r["full_s"] for r in rows),
        "stats_pass_s": sum(r["stats_s"] for r in rows),
        # the last block's outputs feed nothing: its pruned pass is skipped (by us; the reference runs it)
        "ours_floor_s": sum(r["stats_s"] for r in rows) + sum(r["full_s"] for r in rows[:-1]),
        "reference_floor_s": 2 * sum(r["full_s"] for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="a prune_bench.py --json run of the same model and tokens")
    args = p.parse_args()
    C.set_threads(args.threads)
    m = measure(args.model, args.tokens, args.dtype)
    print(f"{args.model} ({args.dtype}, {args.threads} threads), calibration {m['calibration']}")
    print(f"  one full pass of every block           {m['full_pass_s']:7.2f} s")
    print(f"  one statistics pass (to the last input) {m['stats_pass_s']:7.2f} s")
    print(f"  ours: statistics + pruned passes        {m['ours_floor_s']:7.2f} s")
    print(f"  reference / llm-compressor: 2 full      {m['reference_floor_s']:7.2f} s")
    if args.json:
        run = json.loads(Path(args.json).read_text())
        print(
            f"\n  {'method':10} {'pattern':8} {'ours s':>7} {'llmc s':>7} {'ratio':>6} {'our passes s':>12} "
            f"{'floor ratio':>11} {'llmc beyond its passes s':>24}"
        )
        for cell in run.get("results", []):
            ours, llmc = cell.get("ours") or {}, cell.get("llmc") or {}
            if not ours.get("prune_s") or not llmc.get("prune_s"):
                continue
            o, lm = ours["prune_s"], llmc["prune_s"]
            print(
                f"  {cell['method']:10} {cell['pattern']:8} {o:7.2f} {lm:7.2f} {o / lm:6.3f} "
                f"{m['ours_floor_s']:12.2f} {m['ours_floor_s'] / lm:11.3f} {lm - m['reference_floor_s']:24.2f}"
            )


if __name__ == "__main__":
    main()
