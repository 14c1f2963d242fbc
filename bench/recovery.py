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

    python bench/recovery.py --part scale [--scale-steps 3]     # the ~110M random-init Llama: time and memory
    python bench/recovery.py --part tasks [--task-limit 200]    # the shipped lm-eval task, dense/pruned/recovered

`--part scale`: the random-init ~110M Llama of prune_bench.py (hidden 768, 12 blocks, vocabulary 32,000), fp32,
Wanda 50 %, calibration 16×256; no recovery, then full, lora and full+distill for `--scale-steps` steps of
`--batch`×`--seqlen` tokens each, every one in its own process: seconds per step and peak RSS (time and memory
only: a random model has no perplexity worth recovering).
`--part tasks`: stories260k, SparseGPT 2:4 + full recovery (`--steps`), with the shipped local task
(`tinystories_continuation`, `--task-limit` samples) scored by secateurs on the in-memory model before pruning,
after it and after recovery; the dense and the recovered scores are then computed again by calling
`lm_eval.simple_evaluate` directly on the model directories (the source, and the run's exported output) and
the largest difference is printed.
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


SCALE_VARIANTS: dict[str, tuple[str | None, bool]] = {  # name -> (recovery mode, distill)
    "llama100m/prune-only": (None, False),
    "llama100m/full": ("full", False),
    "llama100m/lora": ("lora", False),
    "llama100m/full+distill": ("full", True),
}
TASK = "tinystories_continuation"


def scale_config(name: str, model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    mode, distill = SCALE_VARIANTS[name]
    cfg: dict[str, Any] = {
        "model": str(model_dir),
        "method": "wanda",
        "sparsity": 0.5,
        "dtype": "float32",
        "device": "cpu",
        "calibration": {"source": str(TEXT), "nsamples": 16, "seqlen": 256, "seed": 0},
        "export": {"save_model": False, "masks": False},
    }
    if mode is not None:
        cfg["recovery"] = {
            "source": str(TEXT),
            "steps": a.scale_steps,
            "lr": LR[mode],
            "mode": mode,
            "batch_size": a.batch,
            "seqlen": a.seqlen,
            "seed": 0,
            "distill": distill,
        }
    return cfg


def tasks_config(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    cfg = config("sparsegpt-2:4/full", a)
    cfg["evaluation"] = {**cfg["evaluation"], "tasks": [TASK], "limit": a.task_limit, "batch_size": 16}
    cfg["export"] = {"save_model": True, "masks": False}
    cfg["out"] = str(out)
    return cfg


def run_tasks(cfg: dict[str, Any], threads: int) -> dict[str, Any]:
    """secateurs' scores on the in-memory model, then lm_eval.simple_evaluate on the directories."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from core.pruning import tasks
    from core.pruning.config import PruneConfig
    from core.pruning.run import prune

    torch.set_num_threads(threads)
    out = Path(cfg.pop("out"))
    t = time.perf_counter()
    m = prune(PruneConfig.model_validate(cfg), out).metrics
    wall = time.perf_counter() - t
    ours = m["tasks"]
    direct = {}
    for stage, model_dir in (("dense", MODEL), ("recovered", out)):
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(tasks.SHIPPED_TASKS), include_defaults=False),
            limit=cfg["evaluation"]["limit"],
            batch_size=16,
            device="cpu",
            log_samples=False,
        )
        assert res is not None
        entry = res["results"][TASK]
        direct[stage] = {"acc": entry["acc,none"], "acc_stderr": entry["acc_stderr,none"]}
    return {"ours": ours, "direct": direct, "perplexity": m["perplexity"], "wall_seconds": wall}


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
    ap.add_argument("--part", choices=("stories", "scale", "tasks"), default="stories")
    ap.add_argument("--scale-steps", type=int, default=3)
    ap.add_argument("--task-limit", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "secateurs-bench")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config (JSON) in this process
    ap.add_argument("--one-tasks", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(json.loads(a.one), a.threads)))
        return
    if a.one_tasks:
        print(json.dumps(run_tasks(json.loads(a.one_tasks), a.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    def child(n: str, flag: str, cfg: dict[str, Any]) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--threads", str(a.threads), flag, json.dumps(cfg)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"{n} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    if a.part == "tasks":
        with tempfile.TemporaryDirectory() as tmp:
            r = child("tasks", "--one-tasks", tasks_config(a, Path(tmp) / "out"))
        if a.json:
            a.json.write_text(json.dumps(r, indent=1))
        print_tasks(r, a)
        return
    if a.part == "scale":
        from bench.prune_bench import build_llama100m

        model_dir = build_llama100m(a.workdir / "llama100m", MODEL)
        scale = {n: child(n, "--one", scale_config(n, model_dir, a)) for n in SCALE_VARIANTS}
        if a.json:
            a.json.write_text(json.dumps(scale, indent=1))
        print_scale(scale, a)
        return
    names = [n for n in VARIANTS if not a.only or n in a.only.split(",")]
    results: dict[str, dict[str, Any]] = {}
    for n in names:
        results[n] = child(n, "--one", config(n, a))
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


def print_scale(results: dict[str, dict[str, Any]], a: argparse.Namespace) -> None:
    print(
        f"\n~110M random-init Llama fp32, Wanda 50 %, {a.threads} threads; recovery {a.scale_steps} steps × "
        f"{a.batch}×{a.seqlen} tokens\n"
    )
    print("| run | s/step | recovery s | whole run s | peak RSS MiB | masks |")
    print("|---|---|---|---|---|---|")
    for n, r in results.items():
        step = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "—"
        secs = f"{r['recover_seconds']:.1f}" if r["recover_seconds"] else "—"
        held = "—" if r["mask_violations"] is None else f"{r['mask_violations']} off, {r['achieved_sparsity']:.3f}"
        print(f"| {n} | {step} | {secs} | {r['wall_seconds']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {held} |")


def print_tasks(r: dict[str, Any], a: argparse.Namespace) -> None:
    ours, direct = r["ours"], r["direct"]
    print(
        f"\nstories260k fp32, SparseGPT 2:4 + full recovery ({a.steps} steps); {TASK}, "
        f"{ours['samples'][TASK]} samples, lm-eval {ours['lm_eval_version']}\n"
    )
    print("| model | perplexity | acc ± stderr (secateurs, in memory) | acc ± stderr (simple_evaluate, directory) |")
    print("|---|---|---|---|")
    worst = 0.0
    for stage in ("dense", "pruned", "recovered"):
        mine = ours[stage][TASK]
        theirs = direct.get(stage)
        other = "— (no directory of this stage)"
        if theirs is not None:
            worst = max(worst, abs(mine["acc"] - theirs["acc"]), abs(mine["acc_stderr"] - theirs["acc_stderr"]))
            other = f"{theirs['acc']:.4f} ± {theirs['acc_stderr']:.4f}"
        ppl = r["perplexity"].get(stage)
        print(f"| {stage} | {ppl:.3f} | {mine['acc']:.4f} ± {mine['acc_stderr']:.4f} | {other} |")
    print(f"\nlargest difference to simple_evaluate: {worst:.2e} (whole run {r['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
