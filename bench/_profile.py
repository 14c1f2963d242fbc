"""Profile one run of our engine with cProfile (main environment).

    python bench/_profile.py MODEL_DIR TOKENS.pt METHOD PATTERN [THREADS [DTYPE]]

PATTERN is an unstructured sparsity (0.5) or N:M (2:4). Prints the engine functions that take the
time (cumulative and own), the engine's stage timings and the RSS peak.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import _common as C


def main() -> None:
    model, tokens, method, pattern = sys.argv[1:5]
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    dtype = sys.argv[6] if len(sys.argv) > 6 else "float32"
    C.set_threads(threads)
    from core.pruning.run import prune

    cfg = C.engine_config(model, tokens, method, pattern, dtype)
    out = Path(tempfile.mkdtemp()) / "out"
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    res = prune(cfg, out)
    prof.disable()
    print(
        f"prune() {time.perf_counter() - t0:.2f}s  timings {res.metrics['timings']}  "
        f"peak RSS {C.peak_rss_self_bytes() / 2**20:.0f} MB"
    )
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(28)
        print(s.getvalue())
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
