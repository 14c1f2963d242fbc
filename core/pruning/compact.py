"""Compact sparse checkpoint: pruned weights as their non-zero values plus a bitmask or 2:4 positions.

Layout of a compact directory:
  compact.json                  format description: one entry per tensor (encoding, dtype, shape, source file)
  compact-<shard>.safetensors   for each tensor N, by encoding
                                  dense    N            the tensor as it is
                                  bitmask  N.values     non-zeros in row-major order (see values below)
                                           N.mask       1 bit per element (little-endian bit order), uint8
                                  2:4      N.values     the 2 kept entries of every 4 inputs, row-major
                                           N.pos        their positions 0..3, 2 bits each, 4 per byte, uint8
  every other file of the model directory (config, tokenizer, generation config), copied unchanged.

Values of a sparse tensor with 2- or 4-byte elements are stored as byte planes: N.values.hi, the most
significant byte of each value (sign and exponent, which take few distinct values in a weight matrix),
zstd-compressed; N.values.lo, the other bytes, as they are (mantissa bits, which do not compress). The entry's
"values" field says so ("planes-zstd"); "raw" (1-byte dtypes, or version 1) stores N.values in its dtype.
Dense floating tensors of at least DENSE_PLANES_MIN elements (embeddings, lm_head) are stored the same way by
default (N.values.hi, N.values.lo, "values": "planes-zstd"): still every element, only the exponent bytes
compressed; `compress_dense=False` keeps them as the tensor N.

"Zero" means all bits zero, so -0.0 and NaN are values like any other and the round trip is bit-exact.
A 2-D floating tensor that is exactly 2:4 keeps the 2:4 layout (fixed shape, what semi-structured kernels
consume) even where a bitmask would be a few bytes smaller because some kept entries are zero; any other one
takes a bitmask when that is smaller than dense, so unpruned tensors (embeddings, norms) stay dense. Costs per
element of e bytes and density d, before the values' exponent bytes are compressed: dense e, bitmask
d·e + 1/8, 2:4 e/2 + 1/8; at 50% in fp16 that is 0.5625× for the pruned tensors, and compressing the exponent
byte takes trained or random weights to about 0.44-0.47× (bf16: 0.38-0.40×).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core.pruning.errors import InvalidModelError
from core.pruning.masks import pack_mask, unpack_mask

FORMAT, VERSION = "secateurs-compact", 2
READABLE_VERSIONS = (1, 2)
ZSTD_LEVEL = 3  # ~150-200 MB/s per core, within 0.1-0.3 bit/value of the exponent byte's entropy
META = "compact.json"
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit views by element size
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
for _n in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _n):
        _DTYPES[_n] = getattr(torch, _n)

Source = str | Path | Mapping[str, torch.Tensor] | nn.Module


# ---------------------------------------------------------------------------------------- bit helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view with the same bits, so that `!= 0` is a bitwise test."""
    return t.contiguous().view(_INT[t.element_size()])


def _pack_2bit(p: torch.Tensor) -> torch.Tensor:
    """Values 0..3, four per byte, first in the low bits."""
    p = p.reshape(-1).to(torch.uint8)
    p = torch.cat([p, p.new_zeros(-p.numel() % 4)]).view(-1, 4)
    return p[:, 0] | (p[:, 1] << 2) | (p[:, 2] << 4) | (p[:, 3] << 6)


def _unpack_2bit(b: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], 1).reshape(-1)[:n].long()


# -------------------------------------------------------------------------------------------- values


def _values_codec(t: torch.Tensor) -> str:
    return "planes-zstd" if t.element_size() in (2, 4) else "raw"


def _pack_values(name: str, v: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """1-D values as stored: raw, or split into the exponent-byte plane (compressed) and the other bytes."""
    if codec == "raw":
        return {f"{name}.values": v.contiguous()}
    e = v.element_size()
    planes = v.contiguous().view(torch.uint8).view(-1, e)  # little-endian: the last byte holds sign + exponent
    hi = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(planes[:, e - 1].contiguous().numpy().tobytes())
    return {
        f"{name}.values.hi": torch.frombuffer(bytearray(hi), dtype=torch.uint8),
        f"{name}.values.lo": planes[:, : e - 1].t().contiguous().reshape(-1),
    }


def _unpack_values(
    name: str, codec: str, dtype: torch.dtype, n: int, get: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    if codec == "raw":
        return get(f"{name}.values").reshape(-1)
    e = torch.empty(0, dtype=dtype).element_size()
    if n == 0:
        return torch.empty(0, dtype=dtype)
    hi = zstandard.ZstdDecompressor().decompress(get(f"{name}.values.hi").numpy().tobytes(), max_output_size=n)
    planes = torch.empty(n, e, dtype=torch.uint8)
    planes[:, e - 1] = torch.frombuffer(bytearray(hi), dtype=torch.uint8)
    planes[:, : e - 1] = get(f"{name}.values.lo").view(e - 1, n).t()
    return planes.view(-1).view(dtype)


# ------------------------------------------------------------------------------------------ encodings


def is_24(t: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of each row has at most 2 non-zeros (bitwise)."""
    if t.dim() != 2 or t.shape[1] % 4:
        return False
    return bool(((_bits(t) != 0).view(t.shape[0], -1, 4).sum(2) <= 2).all())


def choose(t: torch.Tensor, allow: tuple[str, ...] = ("2:4", "bitmask")) -> str:
    """Encoding for one tensor: '2:4', 'bitmask' or 'dense' (see the module docstring)."""
    if t.dim() != 2 or not t.is_floating_point() or t.numel() == 0:
        return "dense"
    if "2:4" in allow and is_24(t):  # e/2 + 1/8 per element: always below dense
        return "2:4"
    e, n = t.element_size(), t.numel()
    nnz = int((_bits(t) != 0).sum())
    return "bitmask" if "bitmask" in allow and nnz * e + (n + 7) // 8 < e * n else "dense"


DENSE_PLANES_MIN = 4096  # smaller dense tensors (norms, biases) are not worth a compressed frame


def encode(
    name: str, t: torch.Tensor, enc: str, compress_dense: bool = True
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The stored tensors of one tensor, and how its values are stored (None: a dense tensor as it is)."""
    t = t.detach().cpu().contiguous()
    codec = _values_codec(t)
    if enc == "dense":
        if compress_dense and t.is_floating_point() and t.numel() >= DENSE_PLANES_MIN and codec != "raw":
            return _pack_values(name, t.reshape(-1), codec), codec
        return {name: t}, None
    b = _bits(t)
    if enc == "bitmask":
        keep = b != 0
        return {**_pack_values(name, b[keep].view(t.dtype), codec), f"{name}.mask": pack_mask(keep)}, codec
    if enc == "2:4":
        rows, cols = t.shape
        g = b.view(rows, cols // 4, 4)
        # first the non-zeros, then (only where a group has fewer than 2) the lowest-index zeros; ascending
        key = (g == 0).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8)
        pos = key.argsort(dim=2)[..., :2].sort(dim=2).values
        vals = g.gather(2, pos).view(t.dtype).reshape(-1)
        return {**_pack_values(name, vals, codec), f"{name}.pos": _pack_2bit(pos)}, codec
    raise ValueError(f"unknown encoding {enc!r}")


def decode(name: str, info: dict, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    dtype, shape, enc = _DTYPES[info["dtype"]], tuple(info["shape"]), info["encoding"]
    n, codec = int(np.prod(shape)), info.get("values", "raw")
    if enc == "dense":
        return get(name) if codec == "raw" else _unpack_values(name, codec, dtype, n, get).view(shape)
    if enc == "bitmask":
        keep = unpack_mask(get(f"{name}.mask"), (n,))
        vals = _unpack_values(name, codec, dtype, int(info["nnz"]), get)
        out = torch.zeros(n, dtype=_INT[vals.element_size()])
        out[keep] = _bits(vals)
        return out.view(dtype).view(shape)
    if enc == "2:4":
        rows, cols = shape
        vals = _bits(_unpack_values(name, codec, dtype, n // 2, get)).view(rows, cols // 4, 2)
        pos = _unpack_2bit(get(f"{name}.pos"), n // 2).view(rows, cols // 4, 2)
        out = torch.zeros(rows, cols // 4, 4, dtype=vals.dtype).scatter_(2, pos, vals)
        return out.view(dtype).view(shape)
    raise InvalidModelError(f"tensor {name!r}: unknown encoding {enc!r}")


# ------------------------------------------------------------------------------------------- pack


def pack_checkpoint(
    source: Source,
    out_dir: str | Path,
    encodings: tuple[str, ...] = ("2:4", "bitmask"),
    only: Callable[[str], bool] | None = None,
    compress_dense: bool = True,
) -> dict:
    """Write the compact form of a model directory (safetensors), a state dict or a transformers model.

    `only(name)` limits which tensors may be stored sparse. `compress_dense` stores dense floating tensors of
    at least DENSE_PLANES_MIN elements (embeddings) as byte planes too; False keeps them as they are.
    Returns a summary with byte counts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    dense_bytes = 0
    for shard, tensors in _shards(source, out, aliases):
        stored: dict[str, torch.Tensor] = {}
        for name, t in tensors:
            enc = choose(t, encodings) if only is None or only(name) else "dense"
            parts, codec = encode(name, t, enc, compress_dense)
            stored.update(parts)
            nnz = int((_bits(t) != 0).sum()) if enc != "dense" else None
            entries[name] = {
                "encoding": enc,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "nnz": nnz,
                "file": shard,
                "stored_in": f"compact-{shard}",
                "stored_bytes": sum(v.numel() * v.element_size() for v in parts.values()),
            }
            if codec is not None:
                entries[name]["values"] = codec
            dense_bytes += t.numel() * t.element_size()
        save_file(stored, str(out / f"compact-{shard}"), metadata={"format": FORMAT})
    files = sorted({e["stored_in"] for e in entries.values()})
    summary = {
        "tensor_bytes_dense": dense_bytes,
        "file_bytes_compact": sum((out / f).stat().st_size for f in files),
        "sparse_tensors": sum(e["encoding"] != "dense" for e in entries.values()),
        "encodings": {k: sum(e["encoding"] == k for e in entries.values()) for k in ("dense", "bitmask", "2:4")},
    }
    (out / META).write_text(
        json.dumps(
            {"format": FORMAT, "version": VERSION, "tensors": entries, "aliases": aliases, "summary": summary}, indent=1
        )
    )
    return summary


def _shards(source: Source, out: Path, aliases: dict[str, str]):
    """Yield (original shard file name, [(name, tensor)]) one shard at a time; copy side files to `out`."""
    if isinstance(source, (str, Path)):
        src = Path(source)
        index = src / "model.safetensors.index.json"
        if index.is_file():  # the model's own weight files only (not e.g. a masks.safetensors beside them)
            files = [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            files = [src / "model.safetensors"] if (src / "model.safetensors").is_file() else []
        if not files:
            raise InvalidModelError(f"{src} has no model.safetensors (or index) to pack")
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f != index:
                shutil.copy2(f, out / f.name)
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                yield f.name, [(k, h.get_tensor(k)) for k in h.keys()]  # noqa: SIM118 - not a dict
        return
    if isinstance(source, nn.Module):
        for attr in ("config", "generation_config"):
            cfg = getattr(source, attr, None)
            if cfg is not None and hasattr(cfg, "save_pretrained"):
                try:
                    cfg.save_pretrained(out)
                except ValueError:  # a generation config that transformers refuses to save as is
                    pass
        source = source.state_dict()
    seen: dict[tuple, str] = {}
    kept = []
    for name, t in source.items():  # tied weights share storage: keep the first name, record the others
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept.append((name, t))
    yield "model.safetensors", kept


# ----------------------------------------------------------------------------------------- unpack


def read_meta(compact_dir: str | Path) -> dict:
    p = Path(compact_dir) / META
    if not p.is_file():
        raise InvalidModelError(f"{compact_dir} is not a compact checkpoint (no {META})")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise InvalidModelError(f"{p}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
    return meta


def unpack_state_dict(compact_dir: str | Path, file: str | None = None) -> dict[str, torch.Tensor]:
    """Dense tensors (of one original shard, or all); tied names point at the same tensor."""
    d, meta = Path(compact_dir), read_meta(compact_dir)
    by_store: dict[str, list[str]] = {}
    for name, info in meta["tensors"].items():
        if file is None or info["file"] == file:
            by_store.setdefault(info["stored_in"], []).append(name)
    sd: dict[str, torch.Tensor] = {}
    for store, names in by_store.items():
        with safe_open(str(d / store), framework="pt") as h:
            for name in names:
                sd[name] = decode(name, meta["tensors"][name], h.get_tensor)
    if file is None:
        sd.update({a: sd[c] for a, c in meta["aliases"].items() if c in sd})
    return sd


def unpack(compact_dir: str | Path, out_dir: str | Path) -> Path:
    """Rebuild the dense checkpoint directory (same shard files, index and side files) that transformers loads."""
    d, out = Path(compact_dir), Path(out_dir)
    meta = read_meta(d)
    out.mkdir(parents=True, exist_ok=True)
    stores = {e["stored_in"] for e in meta["tensors"].values()}
    for f in d.iterdir():
        if f.is_file() and f.name != META and f.name not in stores:
            shutil.copy2(f, out / f.name)
    files = sorted({e["file"] for e in meta["tensors"].values()})
    total = 0
    for file in files:
        sd = unpack_state_dict(d, file)
        total += sum(t.numel() * t.element_size() for t in sd.values())
        save_file(sd, str(out / file), metadata={"format": "pt"})
        del sd
    if len(files) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: e["file"] for n, e in sorted(meta["tensors"].items())},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def load_compact(path: str | Path, model_cls=None, **kwargs):
    """One call from a compact directory to a transformers model; kwargs go to `from_pretrained`."""
    import transformers

    if model_cls is None:
        cfg = transformers.AutoConfig.from_pretrained(str(path))
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        model_cls = model_cls or transformers.AutoModelForCausalLM
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:  # the stored dtype, as transformers 5 defaults to
        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = "auto"
    with tempfile.TemporaryDirectory(prefix="secateurs-unpack-") as tmp:
        unpack(path, tmp)
        model = model_cls.from_pretrained(tmp, **kwargs)
        for p in list(model.parameters()) + list(model.buffers()):  # own the memory, not the temp file's map
            p.data = p.data.clone()
    return model
