"""Write a run's output directory atomically: model + tokenizer (sharded safetensors), packed masks,
metrics.json and manifest.json (every file with size and sha256). Nothing appears at `out_dir` until
everything is written."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from core.filemode import as_if_opened
from core.hashing import sha256_file
from core.pruning import preflight

MANIFEST = "manifest.json"
METRICS = "metrics.json"
MASKS = "masks.safetensors"


@dataclass(frozen=True)
class FileEntry:
    name: str  # posix path relative to the output directory
    size: int
    sha256: str
    kind: str  # model | config | tokenizer | masks | metrics | compact | plot | other


def check_out_dir(out_dir: Path) -> None:
    """Again just before writing: the directory may have been filled since the run's preflight."""
    for problem in preflight.out_dir_problems(out_dir):
        raise FileExistsError(problem.message)


def kind_of(name: str) -> str:
    head, sep, rest = name.partition("/")
    if sep and head != "compact":  # a sweep target's own directory: its files are of the kinds they are alone
        return kind_of(rest)
    if name == MANIFEST:
        return "manifest"
    if name.endswith(".svg"):
        return "plot"
    if name == MASKS:
        return "masks"
    if name == METRICS:
        return "metrics"
    if name.startswith("compact/"):
        return "compact"
    if name.endswith((".safetensors", ".bin")) or name.endswith(".safetensors.index.json"):
        return "model"
    if "token" in name or name.endswith((".model", "vocab.json", "merges.txt", "vocab.txt")):
        return "tokenizer"
    if name.endswith(".json"):
        return "config"
    return "other"


def write_masks(path: Path, masks: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    meta = {
        "format": "secateurs.masks/1",
        "bits": "1 = kept, little bit order, row-major in the weight's layout",
        "shapes": json.dumps(shapes),
    }
    save_file({k: v.contiguous() for k, v in masks.items()}, str(path), metadata=meta)


def write_output(
    out_dir: Path,
    *,
    model: nn.Module | None,
    tokenizer: Any,
    masks: dict[str, torch.Tensor],
    mask_shapes: dict[str, list[int]],
    metrics: dict[str, Any],
    max_shard_size: str = "2GB",
    extra: Callable[[Path], None] | None = None,
) -> list[FileEntry]:
    """Write everything into a hidden sibling directory, hash it, then rename it into place."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if model is not None:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if masks:
            write_masks(tmp / MASKS, masks, mask_shapes)
        if extra is not None:
            extra(tmp)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        as_if_opened(*written)
        files = [
            FileEntry(
                p.relative_to(tmp).as_posix(), p.stat().st_size, sha256_file(p), kind_of(p.relative_to(tmp).as_posix())
            )
            for p in written
        ]
        manifest = {"format": "secateurs.manifest/1", "files": [asdict(f) for f in files]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files + [
        FileEntry(MANIFEST, (out_dir / MANIFEST).stat().st_size, sha256_file(out_dir / MANIFEST), "manifest")
    ]


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def verify(out_dir: Path) -> list[str]:
    """Files whose size or sha256 differs from the manifest (empty when the directory is intact)."""
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    bad = []
    for f in manifest["files"]:
        p = Path(out_dir) / f["name"]
        if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            bad.append(f["name"])
    return bad
