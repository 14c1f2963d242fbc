"""Helpers shared by the bench workers.

This module is imported both by the workers that run in the main environment and by
`llmc_runner.py`, which runs inside the llm-compressor virtualenv: it must depend on
nothing but the standard library, torch and transformers.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

# Decoder-block linears that both tools prune (lm_head, embeddings and norms never are).
BLOCK_LINEAR_RE = re.compile(r"\.layers\.(\d+)\..*\.weight$")


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_self_bytes() -> int:
    """Peak RSS of this process image (VmHWM), in bytes.

    Not ru_maxrss: Linux carries the parent's resident size at fork over exec into the child's ru_maxrss,
    so a worker started by a large orchestrator would report at least the orchestrator's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    # Inter-op pool too, so that neither tool gets more cores than the other.
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass


def read_spec(argv: list[str]) -> tuple[dict[str, Any], Path]:
    """Workers are called as `worker.py SPEC.json RESULT.json`."""
    if len(argv) != 3:
        sys.exit(f"usage: {argv[0]} SPEC.json RESULT.json")
    return json.loads(Path(argv[1]).read_text()), Path(argv[2])


def write_result(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


class Clock:
    """Named wall-clock stages plus RSS snapshots, reported by each worker."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.stages: dict[str, float] = {}
        self.rss: dict[str, int] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.stages[name] = now - self.last
        self.last = now
        self.rss[name] = rss_bytes()
        return self.stages[name]


def load_tokens(path: str | Path):
    """Token ids saved by the orchestrator as an int64 tensor [nsamples, seqlen]."""
    import torch

    t = torch.load(path, map_location="cpu", weights_only=True)
    if t.dim() != 2:
        raise ValueError(f"{path}: expected [nsamples, seqlen] token ids, got shape {tuple(t.shape)}")
    return t.long()


def engine_config(model: str, tokens: str, method: str, pattern: str, dtype: str = "float32"):
    """A PruneConfig for one engine run on pre-tokenised calibration windows, saving nothing; PATTERN is an
    unstructured sparsity (0.5) or N:M (2:4). For the profiling scripts."""
    from core.pruning.config import CalibrationConfig, ExportConfig, PruneConfig

    t = load_tokens(tokens)
    nm = ":" in pattern
    return PruneConfig(
        model=model,
        method=method,
        sparsity=None if nm else float(pattern),
        pattern=pattern if nm else None,
        device="cpu",
        dtype=dtype,
        calibration=CalibrationConfig(source=tokens, nsamples=t.shape[0], seqlen=t.shape[1]),
        evaluation=None,
        export=ExportConfig(save_model=False, masks=False),
    )


def block_linear_stats(model) -> dict[str, Any]:
    """Sparsity over every decoder-block linear weight and a 2:4 validity check."""

    total = zeros = 0
    nm_ok = True
    layers = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or not BLOCK_LINEAR_RE.search(name):
            continue
        w = p.detach()
        layers += 1
        total += w.numel()
        zeros += int((w == 0).sum())
        if w.shape[1] % 4 == 0:
            nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            nm_ok = nm_ok and bool((nz <= 2).all())
        else:
            nm_ok = False
    return {
        "pruned_layers": layers,
        "block_linear_params": total,
        "sparsity": zeros / total if total else 0.0,
        "valid_2_4": nm_ok,
    }


def perplexity(model, windows, batch_size: int = 8) -> float:
    """Token-level mean NLL over non-overlapping windows [n, seqlen], exp'd.

    Every window is scored on its own; its first token is context only, as in the
    Wanda / SparseGPT evaluation loops.
    """
    import torch
    import torch.nn.functional as F

    model.eval()
    nll = 0.0
    count = 0
    with torch.inference_mode():
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i : i + batch_size]
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += x[:, 1:].numel()
            del logits
    return math.exp(nll / count)
