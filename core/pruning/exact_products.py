"""Float32 products of activations that a narrower format already holds exactly, on faster units.

A bfloat16 model's activations are bfloat16 values: rounding them to bfloat16 again changes nothing, and the
product of two such numbers (8-bit significands) is exact in float32. So XᵀX of those inputs may run on
bfloat16 matrix units (AMX, AVX512-BF16) or TF32 tensor cores (10-bit significands, which also hold float16
values) with float32 accumulation, and differ from a float32 product only in summation order. For any other
input (a float32 model) nothing changes: its products stay full float32."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch


@cache
def _cpu_bf16_mode_works() -> bool:
    """oneDNN honours fp32_precision "bf16" here: AMX tiles or AVX512-BF16 dot products, and a product that
    shows the rounding. Seen with torch 2.13: AVX512-BF16 without AMX keeps full float32 products under the
    flag, so the flag buys nothing there (and without either unit oneDNN emulates bf16, slower than sgemm)."""
    if not any(getattr(torch.cpu, p, lambda: False)() for p in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")):
        return False
    flags = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]  # not in torch's stubs
    try:
        before = flags.fp32_precision
        flags.fp32_precision = "bf16"
    except (AttributeError, RuntimeError):
        return False
    try:
        a = torch.full((256, 256), 1 + 2**-12)  # not a bf16 value: rounded, it is 1 and a @ a is exactly 256
        return bool((a @ a)[0, 0] == 256)
    finally:
        flags.fp32_precision = before


def reduced_mode(source: torch.dtype, device: torch.device) -> tuple[Any, str] | None:
    """(backend flags, precision) under which float32 products of `source`-valued inputs stay exact and run
    faster on `device`; None where no such mode exists."""
    if device.type == "cuda" and source in (torch.bfloat16, torch.float16):
        return torch.backends.cuda.matmul, "tf32"
    if (
        device.type == "cpu"
        and source == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and _cpu_bf16_mode_works()
    ):
        return torch.backends.mkldnn.matmul, "bf16"  # type: ignore[attr-defined]
    return None


@contextmanager
def exact_fp32_products(source: torch.dtype, device: torch.device) -> Iterator[bool]:
    """Within the block, float32 matmuls on `device` may use the reduced mode that is exact for inputs of
    dtype `source`; yields whether it is on. The flag is process-wide, so keep the block to the products."""
    mode = reduced_mode(source, device)
    if mode is None:
        yield False
        return
    flags, precision = mode
    try:
        before = flags.fp32_precision
        flags.fp32_precision = precision
    except (AttributeError, RuntimeError):  # an older torch, or precision set through the legacy API
        yield False
        return
    try:
        yield True
    finally:
        flags.fp32_precision = before
