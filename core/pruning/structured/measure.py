"""What a user asks of a smaller model: parameters, bytes on disk, and measured generation speed."""

from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.pruning import models


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint stores (tied tensors once): the safetensors payload."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def dir_bytes(path: str | Path) -> int:
    """Bytes of the weight files (safetensors / bin) of a saved model directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin"))


def can_generate(model: nn.Module) -> bool:
    fn = getattr(model, "can_generate", None)
    return bool(fn()) if callable(fn) else False


@torch.inference_mode()
def generation_speed(
    model: nn.Module, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3, seed: int = 0, warmup: int = 2
) -> dict | None:
    """Median tokens/s of prefill (one forward over a prompt) and greedy decode with the KV cache, batch 1.
    None for models that cannot generate (encoders)."""
    if not can_generate(model):
        return None
    dev = next(model.parameters()).device
    limit = models.max_positions(model)
    if limit:
        prompt_len = min(prompt_len, limit - new_tokens)
    g = torch.Generator().manual_seed(seed)
    config: Any = model.config
    ids = torch.randint(0, config.vocab_size, (1, prompt_len), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x renamed it

    def step(x: torch.Tensor, cache) -> tuple:
        out = model(input_ids=x, use_cache=True, **({key: cache} if cache is not None else {}))
        return (out.get("cache") or out.get("past_key_values")), out.logits[:, -1:].argmax(-1)

    def once() -> tuple[float, float, float, float]:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        cache, nxt = step(ids, None)
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            cache, nxt = step(nxt, cache)
        sync()
        return t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1

    was_training = model.training
    model.eval()
    for _ in range(warmup):  # first calls pick kernels
        once()
    runs = [once() for _ in range(repeats)]
    model.train(was_training)
    pre, dec, cpre, cdec = (statistics.median(r[i] for r in runs) for i in range(4))
    # per second of this process's CPU time (all its threads): steadier than wall time on a shared machine
    return {
        "prefill_tokens_per_s": prompt_len / pre,
        "decode_tokens_per_s": new_tokens / dec,
        "prefill_tokens_per_cpu_s": prompt_len / max(cpre, 1e-9),
        "decode_tokens_per_cpu_s": new_tokens / max(cdec, 1e-9),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch": 1,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": str(dev),
    }
