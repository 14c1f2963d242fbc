"""Masks stored at one bit per weight: 1 = kept, numpy 'little' bit order, row-major in the weight's layout."""

from __future__ import annotations

import numpy as np
import torch


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.reshape(-1).numpy().astype(bool, copy=False), bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))
