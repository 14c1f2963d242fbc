"""Where our engine's peak RSS comes from: the peak of each engine call, one pruning run (main environment).

    python bench/_phase_memory.py MODEL_DIR TOKENS.pt METHOD PATTERN [DTYPE [BLOCK]]

Before each wrapped engine call the kernel's high-water mark is reset (`/proc/self/clear_refs` ← 5) and read
after it, so every line is that call's own peak: RSS before -> after, peak. Without BLOCK it prints each
call that raised the run's maximum; with BLOCK, every call of that block (0-based). Linux only.
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import _common as C  # noqa: E402


def rss_mib() -> int:
    return C.rss_bytes() >> 20


def peak_mib() -> int:
    return C.peak_rss_self_bytes() >> 20


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    model, tokens, method, pattern = sys.argv[1:5]
    dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
    only = int(sys.argv[6]) if len(sys.argv) > 6 else None
    C.set_threads(2)
    from core.pruning import engine, walk
    from core.pruning.methods import REGISTRY
    from core.pruning.run import prune

    block, run_max, depth = [0], [0], [0]

    def wrap(owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            if depth[0] or (only is not None and block[0] != only):
                return fn(*args, **kwargs)
            depth[0] += 1
            before = rss_mib()
            reset_peak()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                peak, after = peak_mib(), rss_mib()
                if only is not None or peak > run_max[0]:
                    print(f"block {block[0]:>2}  {label:<22} rss {before} -> {after} MiB, peak {peak} MiB")
                run_max[0] = max(run_max[0], peak)

        setattr(owner, name, traced)

    for name in ("collect", "advance", "run"):
        wrap(walk.BlockInputs, name, name)
    wrap(walk, "capture", "capture")
    for name in ("_weight_to_prune", "_write_back", "release_freed_memory"):
        wrap(engine, name, name.lstrip("_"))
    for cls in REGISTRY.values():
        wrap(cls, "prune_many", f"{cls.name}.prune_many")

    def on_progress(p) -> None:
        if p.block is not None:
            block[0] = p.block + 1

    cfg = C.engine_config(model, tokens, method, pattern, dtype)
    out = Path(tempfile.mkdtemp(prefix="phase-memory-")) / "out"
    try:
        prune(cfg, out, on_progress=on_progress)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    print(f"run peak {peak_mib()} MiB (since the last reset), largest call peak {run_max[0]} MiB")


if __name__ == "__main__":
    main()
