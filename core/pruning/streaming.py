"""Streaming a model through the pruning walk, so that host memory does not grow with depth.

The source checkpoint's weights stay memory-mapped (safetensors); only the block being pruned owns memory of
its own. Once a block is finished its weights and packed masks are written to one shard of its own
(``block-<i>.safetensors``, fsync'd), and the block's tensors are replaced by views mapped from that file,
whose pages are then let go: what is left of a finished block is file pages the kernel may drop. The output is
assembled from those mappings by ``streamed_save``, one tensor at a time. Peak host memory is then about the
largest block + the calibration activations + what lies outside the blocks (embeddings, head)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.pruning import memory

WEIGHT, MASK = "weight:", "mask:"  # key prefixes inside a block shard

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def write_safetensors(
    path: Path | str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write a safetensors file one tensor at a time (safetensors' own save_file first builds the whole file's
    bytes in memory) and return its sha256. A tensor that lies in a file mapping has its pages let go once
    written; the file is fsync'd before this returns."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # as safetensors: aligned, by name
    for k in order:
        t = tensors[k]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{k}: dtype {t.dtype} cannot be written to safetensors")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for part in (struct.pack("<Q", len(raw)), raw):
            f.write(part)
            h.update(part)
        for k in order:
            t = tensors[k].detach()
            if t.device.type != "cpu":
                t = t.cpu()
            c = t.contiguous()
            if c.numel():
                buf = memoryview(c.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
                f.write(buf)
                h.update(buf)
                del buf
            if c.data_ptr() == t.data_ptr() and memory.file_mapped([t])[0]:
                memory.release_file_pages(t)
            del c, t
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_mapped(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file mapped from it, their pages let go (read again from the file on use)."""
    from safetensors.torch import load_file

    back = load_file(str(path))
    for t, mapped in zip(back.values(), memory.file_mapped(list(back.values())), strict=True):
        if mapped:
            memory.release_file_pages(t)
    return back


def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's parameters and buffers by their names inside the block (shared tensors once per name)."""
    out = {n: p.data for n, p in block.named_parameters(remove_duplicate=False)}
    out.update({n: b for n, b in block.named_buffers(remove_duplicate=False) if b is not None})
    return out


def point_at(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the block's parameters and buffers by the given tensors (by name inside the block)."""
    for n, p in block.named_parameters(remove_duplicate=False):
        if n in tensors:
            p.data = tensors[n]
    for mod_name, mod in block.named_modules(remove_duplicate=False):
        for bn, b in list(mod._buffers.items()):
            full = f"{mod_name}.{bn}" if mod_name else bn
            if b is not None and full in tensors:
                mod._buffers[bn] = tensors[full]


class BlockStream:
    """Finished blocks out of memory: each is written to ``<dir>/block-<i>.safetensors`` with its packed masks
    (mask names are the weights' full names) and mapped back from it."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.safetensors"

    def write(self, i: int, block: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[Path, str]:
        """Write block i's shard; returns it and its sha256."""
        tensors = {WEIGHT + n: t for n, t in block_tensors(block).items()}
        tensors.update({MASK + n: m for n, m in masks.items()})
        path = self.path(i)
        sha = write_safetensors(path, tensors, {"format": "secateurs.block/1", "block": str(i)})
        return path, sha

    @staticmethod
    def restore(path: Path, block: nn.Module) -> dict[str, torch.Tensor]:
        """Point the block at the shard's weights (mapped); returns the shard's masks (mapped)."""
        back = load_mapped(path)
        point_at(block, {k[len(WEIGHT) :]: v for k, v in back.items() if k.startswith(WEIGHT)})
        return {k[len(MASK) :]: v for k, v in back.items() if k.startswith(MASK)}

    def finish(
        self, i: int, block: nn.Module, masks: dict[str, torch.Tensor]
    ) -> tuple[Path, str, dict[str, torch.Tensor]]:
        """Write block i and let go of its memory; returns the shard, its sha256 and its masks, mapped."""
        path, sha = self.write(i, block, masks)
        mapped = self.restore(path, block)
        memory.release_freed_memory()
        return path, sha, mapped


@contextmanager
def streamed_save() -> Iterator[None]:
    """While inside, transformers' save_pretrained writes each shard with write_safetensors (one tensor at a
    time, mapped pages let go as written) instead of building each shard's bytes in memory."""
    import transformers.modeling_utils as mu

    original = mu.safe_save_file

    def save(
        tensors: dict[str, torch.Tensor], filename: str | os.PathLike, metadata: dict[str, str] | None = None
    ) -> None:
        write_safetensors(filename, tensors, metadata)

    mu.safe_save_file = save
    try:
        yield
    finally:
        mu.safe_save_file = original
