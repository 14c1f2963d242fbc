"""Main-environment worker of the bench: one pruning run through secateurs' engine.

    python bench/_ours_runner.py SPEC.json RESULT.json

SPEC keys: model (dir), tokens (.pt int64 [nsamples, seqlen]), method, sparsity (float or
null), pattern (null or "N:M"), threads, dtype (default float32), out_dir, extra (dict of
further PruneConfig fields).

No evaluation inside the run (perplexity is measured afterwards by `_eval_runner.py`, with the
same code for both tools), so the peak RSS is that of loading + calibration + pruning + export.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import _common as C

# Engine stages that are not part of the work llm-compressor's timed `oneshot` call does
# (it gets an already loaded model and saves nothing).
NOT_PRUNING = ("load", "export", "save", "evaluate", "eval")


def main() -> None:
    spec, out = C.read_spec(sys.argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    clock = C.Clock()
    import torch
    import transformers

    from core.pruning.config import CalibrationConfig, ExportConfig, PruneConfig
    from core.pruning.run import prune

    C.set_threads(int(spec["threads"]))
    clock.lap("import")

    tokens = C.load_tokens(spec["tokens"])
    ns, sl = tokens.shape
    cfg = PruneConfig(
        model=spec["model"],
        method=spec["method"],
        sparsity=spec.get("sparsity"),
        pattern=spec.get("pattern"),
        device="cpu",
        dtype=spec.get("dtype", "float32"),
        calibration=CalibrationConfig(source=str(spec["tokens"]), nsamples=ns, seqlen=sl, seed=0),
        evaluation=None,
        export=ExportConfig(save_model=True, masks=False),
        **spec.get("extra", {}),
    )
    out_dir = Path(spec["out_dir"])
    if out_dir.exists():  # a previous attempt of the same cell (the engine refuses a non-empty out_dir)
        import shutil

        shutil.rmtree(out_dir)
    # (wall, process CPU) at each stage boundary the engine reports; the CPU time of the pruning work is
    # the span from the first event after loading ("calibrate") to the "export" event.
    marks: dict[str, tuple[float, float]] = {}
    rss_at_events: list[tuple[str, int, int]] = []  # (stage/block, current RSS, peak RSS so far)

    def on_progress(p) -> None:
        marks.setdefault(p.stage, (time.perf_counter(), time.process_time()))
        tag = p.stage if p.block is None else f"{p.stage} block {p.block}"
        rss_at_events.append((tag, C.rss_bytes(), C.peak_rss_self_bytes()))

    t = time.perf_counter()
    result = prune(cfg, out_dir, on_progress=on_progress)
    total_s = time.perf_counter() - t
    clock.lap("prune_call")

    metrics = result.metrics or {}
    timings = metrics.get("timings") or {}
    flat = {k: v for k, v in timings.items() if isinstance(v, (int, float)) and k != "total"}
    excluded = {k: v for k, v in flat.items() if any(w in k.lower() for w in NOT_PRUNING)}
    prune_s = total_s - sum(excluded.values()) if flat else total_s
    span = None
    if "calibrate" in marks and "export" in marks:
        span = {
            "wall_s": marks["export"][0] - marks["calibrate"][0],
            "cpu_s": marks["export"][1] - marks["calibrate"][1],
        }
    C.write_result(
        out,
        {
            "tool": "secateurs",
            "prune_s": prune_s,
            "prune_call_s": total_s,
            "prune_cpu_s": span["cpu_s"] if span else None,
            "calibrate_to_export_wall_s": span["wall_s"] if span else None,
            "excluded_stages": excluded,
            "engine_timings": timings,
            "engine_memory": metrics.get("memory"),
            "engine_perplexity": metrics.get("perplexity"),
            "engine_sparsity": metrics.get("achieved_sparsity"),
            "engine_calibration": metrics.get("calibration"),
            "damping_retries": metrics.get("damping_retries"),
            "rss_at_events": rss_at_events,
            "stages": clock.stages,
            "rss_at": clock.rss,
            "peak_rss_self": C.peak_rss_self_bytes(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
