"""Recovery fine-tuning after pruning on stories260k: how much of the perplexity lost to one-shot pruning comes
back, per mode, at equal steps and tokens.

    python bench/recovery.py [--threads 2] [--steps 100] [--batch 8] [--seqlen 256] [--json out.json]
                             [--only sparsegpt-2:4/full,...]

Every variant runs in its own process (peak RSS per mode is that process's VmHWM), float32, on CPU:
calibration 64×256 windows of tinystories-valid.txt; perplexity on its first `--eval-windows` non-overlapping
256-token windows; recovery windows drawn (seeded) only from the tokens after those, so training never sees
an evaluated token. Each mode trains for the same steps × batch × seqlen tokens.

Table 1, per method: dense / one-shot / recovered perplexity and the fraction of the log-perplexity gap closed,
(ln ppl_oneshot − ln ppl_rec) / (ln ppl_oneshot − ln ppl_dense), for full, lora and full+distill; the time per
step, the recovery's wall time and the peak RSS of each. The dense model fine-tuned the same way (full, same
data, steps, lr, batch) is the ceiling: small models keep learning on in-domain text, so a gap closed above 1 is
possible, and sparse-FT / dense-FT perplexity says how far the sparse model really is behind.
Table 2: gradual (3 cubic stages to 70%, Wanda) against one-shot 70% followed by the same total recovery steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "stories260k-hf"
TEXT = SHARED / "text" / "tinystories-valid.txt"
LR = {"full": 1e-3, "lora": 2e-3}  # LoRA needs a higher lr for the same number of steps

# name -> (method, target, recovery mode or None, distill, gradual stages)
VARIANTS: dict[str, tuple[str, str, str | None, bool, int]] = {
    "dense/full": ("magnitude", "0", "full", False, 1),
    "sparsegpt-2:4/oneshot": ("sparsegpt", "2:4", None, False, 1),
    "sparsegpt-2:4/full": ("sparsegpt", "2:4", "full", False, 1),
    "sparsegpt-2:4/lora": ("sparsegpt", "2:4", "lora", False, 1),
    "sparsegpt-2:4/full+distill": ("sparsegpt", "2:4", "full", True, 1),
    "wanda-0.7/oneshot": ("wanda", "0.7", None, False, 1),
    "wanda-0.7/full": ("wanda", "0.7", "full", False, 1),
    "wanda-0.7/lora": ("wanda", "0.7", "lora", False, 1),
    "wanda-0.7/full+distill": ("wanda", "0.7", "full", True, 1),
    "wanda-0.7/gradual3+full": ("wanda", "0.7", "full", False, 3),
}


def config(name: str, a: argparse.Namespace) -> dict[str, Any]:
    method, target, mode, distill, stages = VARIANTS[name]
    cfg: dict[str, Any] = {
        "model": str(MODEL),
        "method": method,
        "dtype": "float32",
        "device": "cpu",
        "calibration": {"source": str(TEXT), "nsamples": 64, "seqlen": 256, "seed": 0},
        "evaluation": {"source": str(TEXT), "seqlen": 256, "max_windows": a.eval_windows},
        "export": {"save_model": False, "masks": False},
    }
    cfg.update({"pattern": target} if ":" in target else {"sparsity": float(target)})
    if mode is not None:
        cfg["recovery"] = {
            "steps": a.steps,
            "lr": LR[mode],
            "mode": mode,
            "batch_size": a.batch,
            "seqlen": a.seqlen,
            "seed": 0,
            "warmup_steps": a.steps // 10,
            "distill": distill,
            "lora": {"r": 16, "alpha": 32},
        }
    if stages > 1:
        cfg["gradual"] = {"stages": stages, "schedule": "cubic"}
    return cfg


def run_one(cfg: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    from bench._common import peak_rss_self_bytes
    from core.pruning.config import PruneConfig
    from core.pruning.run import prune

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        m = prune(PruneConfig.model_validate(cfg), Path(tmp) / "out").metrics
        wall = time.perf_counter() - t
    rec = m.get("recovery") or {}
    runs = rec.get("runs") or []
    return {
        "perplexity": m["perplexity"],
        "achieved_sparsity": m["achieved_sparsity"],
        "recover_seconds": rec.get("seconds"),
        "seconds_per_step": rec["seconds"] / rec["steps"] if rec else None,
        "tokens_seen": rec.get("tokens_seen"),
        "mask_violations": rec.get("mask_violations"),
        "lora": rec.get("lora"),
        "loss_first_last": [runs[0]["loss_first"], runs[-1]["loss_last"]] if runs else None,
        "gradual": m.get("gradual"),
        "split": (rec.get("data") or {}).get("split"),
        "wall_seconds": wall,
        "peak_rss_bytes": peak_rss_self_bytes(),
    }


def closed(dense: float, oneshot: float, rec: float) -> float:
    return (math.log(oneshot) - math.log(rec)) / (math.log(oneshot) - math.log(dense))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config (JSON) in this process
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(json.loads(a.one), a.threads)))
        return
    names = [n for n in VARIANTS if not a.only or n in a.only.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    results: dict[str, dict[str, Any]] = {}
    for n in names:
        cmd = [sys.executable, __file__, "--threads", str(a.threads), "--one", json.dumps(config(n, a))]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"{n} failed:\n{out.stderr[-3000:]}")
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[n]
        print(
            f"  {n}: ppl {r['perplexity'].get('recovered', r['perplexity']['pruned']):.3f} ({r['wall_seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    print_tables(results, a)


def print_tables(results: dict[str, dict[str, Any]], a: argparse.Namespace) -> None:
    print(
        f"\nstories260k fp32, {a.threads} threads; recovery {a.steps} steps × {a.batch}×{a.seqlen} tokens; "
        f"perplexity on {a.eval_windows}×256 windows training never saw\n"
    )
    dense_ft = results.get("dense/full", {}).get("perplexity", {}).get("recovered")
    print(
        "| method | mode | dense | one-shot | recovered | gap closed | sparse-FT / dense-FT | s/step | "
        "recovery s | peak RSS MiB | masks |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    if dense_ft:
        r = results["dense/full"]
        print(
            f"| dense | full | {r['perplexity']['dense']:.3f} | — | {dense_ft:.3f} | — | 1 | "
            f"{r['seconds_per_step']:.3f} | {r['recover_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | — |"
        )
    for method in ("sparsegpt-2:4", "wanda-0.7"):
        for mode in ("oneshot", "full", "lora", "full+distill"):
            r = results.get(f"{method}/{mode}")
            if r is None:
                continue
            p = r["perplexity"]
            rec = p.get("recovered")
            gap = f"**{closed(p['dense'], p['pruned'], rec):.2f}**" if rec else "—"
            ratio = f"{rec / dense_ft:.3f}" if rec and dense_ft else "—"
            step = f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] else "—"
            secs = f"{r['recover_seconds']:.1f}" if r["recover_seconds"] else "—"
            held = "—" if r["mask_violations"] is None else f"{r['mask_violations']} off, {r['achieved_sparsity']:.3f}"
            print(
                f"| {method} | {mode} | {p['dense']:.3f} | {p['pruned']:.3f} | "
                f"{'—' if rec is None else f'{rec:.3f}'} | {gap} | {ratio} | {step} | {secs} | "
                f"{r['peak_rss_bytes'] / 2**20:.0f} | {held} |"
            )
    for n, r in results.items():
        if r.get("lora"):
            print(
                f"\n{n}: LoRA merge, largest change of a kept weight {r['lora']['merge_max_kept_weight_change']:.4g}, "
                f"largest adapter value re-masked {r['lora']['merge_max_removed_delta']:.4g}"
            )
    g, o = results.get("wanda-0.7/gradual3+full"), results.get("wanda-0.7/full")
    if g and o:
        stages = g["gradual"]["per_stage"]
        print("\n| Wanda 70% | recovery steps | perplexity after | wall s |")
        print("|---|---|---|---|")
        print(f"| one-shot + full | {a.steps} | {o['perplexity']['recovered']:.3f} | {o['wall_seconds']:.0f} |")
        print(
            f"| gradual 3 (cubic {', '.join(f'{t:.3f}' for t in g['gradual']['targets'])}) + full | "
            f"{' + '.join(map(str, g['gradual']['recovery_steps']))} | {g['perplexity']['recovered']:.3f} | "
            f"{g['wall_seconds']:.0f} |"
        )
        for s in stages[:-1]:
            print(
                f"| stage {s['stage']} at {s['achieved_sparsity']:.3f} | {s.get('recover_steps', 0)} | "
                f"pruned {s.get('perplexity_pruned', math.nan):.3f}, recovered {s.get('perplexity_recovered', math.nan):.3f} | |"
            )


if __name__ == "__main__":
    main()
