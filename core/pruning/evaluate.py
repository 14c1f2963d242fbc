"""Perplexity with a pinned protocol: documents joined with "\\n\\n", tokenised once, cut into
non-overlapping `seqlen` windows (partial tail dropped), token-level mean NLL over all windows, exp."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.pruning.calibration import _tokenize, load_named, read_texts
from core.pruning.config import NAMED_SETS, EvalConfig
from core.pruning.errors import EvaluationError


def eval_tokens(cfg: EvalConfig, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    assert cfg.source is not None
    if cfg.source in NAMED_SETS:
        texts = load_named(cfg.source, "validation" if cfg.source == "c4" else "test")
    else:
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise EvaluationError(f"evaluation source {cfg.source!r} is neither a named set nor an existing file")
        texts = read_texts(path)
    return _tokenize("\n\n".join(texts), tokenizer), {"source": cfg.source, "join": "\\n\\n"}


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise EvaluationError(f"evaluation text gives {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = device or next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for lg, ids_w in zip(
            logits, batch, strict=True
        ):  # one window at a time: no float copy of the whole batch's logits
            # token t+1 is predicted from tokens ≤ t; the first token of each window is context only
            nll += nn.functional.cross_entropy(lg[:-1].float(), ids_w[1:], reduction="sum").item()
        count += batch[:, 1:].numel()
        del logits
    ppl = math.exp(nll / count)
    if not math.isfinite(ppl):
        ppl = float("inf")
    return {"perplexity": ppl, "windows": n, "seqlen": seqlen, "tokens_scored": count}
