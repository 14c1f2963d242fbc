"""A sparsity sweep against the single runs it replaces, timed in one process.

    python bench/sweep.py [--models stories260k,babyllama105] [--methods wanda,sparsegpt] [--threads 1]
                          [--ratios 0.3,0.4,0.5,0.6,0.7] [--nsamples 64] [--seqlen 256] [--eval-windows 64]
                          [--json out.json]

For each model and method: one sweep job over the ratios (`run.prune` with `sparsities`), then one single-ratio
run per ratio (`run.prune` with `sparsity`), in that order, in the same process (imports and the page cache
are warm for both, so the single runs are not charged for a process start; an untimed warm-up run comes first).
Each run writes its output directory (metrics only: no model is exported, as in a sweep whose targets are not
marked). Reported: wall time of the sweep and the sum of the single runs (and their CPU time: steadier than wall
time when other processes share the cores), the sweep's shared stages (load, calibration, dense evaluation)
and its per-target time, and whether every target's perplexity equals the single run's (it should, exactly).
The models are the real trained ones in ../shared (stories260k and babyllama105); calibration on TinyStories
validation text, perplexity on the same file (the models' own domain).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "assets"
MODELS = {"stories260k": "stories260k-hf", "babyllama105": "babyllama105-hf"}


def _assets() -> Path:
    for p in (SHARED, Path("/work/shared/assets")):
        if p.is_dir():
            return p
    sys.exit("the shared assets (stories260k-hf, text/) are not found beside the checkout")


def bench(model: str, method: str, ratios: list[float], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from core.pruning.config import PruneConfig
    from core.pruning.run import prune

    assets = _assets()
    text = str(assets / "text" / "tinystories-valid.txt")
    base: dict[str, Any] = {
        "model": str(assets / MODELS[model]),
        "method": method,
        "device": "cpu",
        "calibration": {"source": text, "nsamples": args.nsamples, "seqlen": args.seqlen},
        "evaluation": {"source": text, "seqlen": args.seqlen, "max_windows": args.eval_windows},
        "export": {"save_model": False, "masks": False},
    }
    # warm-up (not timed): the first load in a process imports the model's code and reads the files cold
    warm = {**base, "calibration": {"source": text, "nsamples": 2, "seqlen": 32}, "evaluation": None}
    prune(PruneConfig.model_validate({**warm, "sparsity": 0.5}), tmp / f"{model}-{method}-warm")
    t, c = time.perf_counter(), time.process_time()
    swept = prune(PruneConfig.model_validate({**base, "sparsities": ratios}), tmp / f"{model}-{method}-sweep").metrics
    sweep_s, sweep_cpu = time.perf_counter() - t, time.process_time() - c
    singles: list[float] = []
    singles_cpu = 0.0
    same = True
    for x, point in zip(ratios, swept["sweep"]["points"], strict=True):
        t, c = time.perf_counter(), time.process_time()
        m = prune(PruneConfig.model_validate({**base, "sparsity": x}), tmp / f"{model}-{method}-{x}").metrics
        singles.append(time.perf_counter() - t)
        singles_cpu += time.process_time() - c
        same &= m["perplexity"]["pruned"] == point["perplexity"]
    return {
        "model": model,
        "method": method,
        "ratios": ratios,
        "sweep_s": round(sweep_s, 2),
        "singles_s": round(sum(singles), 2),
        "single_each_s": [round(s, 2) for s in singles],
        "sweep_cpu_s": round(sweep_cpu, 2),
        "singles_cpu_s": round(singles_cpu, 2),
        "shared_s": swept["timings"]["shared"],
        "per_target_s": [p["wall_s"] for p in swept["sweep"]["points"]],
        "dense_copy_bytes": swept["memory"]["dense_copy_bytes"],
        "dense_perplexity": swept["perplexity"]["dense"],
        "perplexity": [round(p["perplexity"], 3) for p in swept["sweep"]["points"]],
        "perplexity_equal_to_singles": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260k,babyllama105")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--ratios", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    ratios = [float(x) for x in args.ratios.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="secateurs-sweep-bench-") as d:
        for model in args.models.split(","):
            for method in args.methods.split(","):
                r = bench(model, method, ratios, args, Path(d))
                rows.append(r)
                shared = ", ".join(f"{k} {v:.2f}" for k, v in r["shared_s"].items())
                print(
                    f"{model:13s} {method:9s} sweep {r['sweep_s']:7.2f} s  singles {r['singles_s']:7.2f} s  "
                    f"(x{r['singles_s'] / r['sweep_s']:.2f}); CPU {r['sweep_cpu_s']:.2f} vs {r['singles_cpu_s']:.2f} s; "
                    f"shared: {shared}; per target "
                    f"{', '.join(f'{s:.2f}' for s in r['per_target_s'])}; equal: {r['perplexity_equal_to_singles']}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
