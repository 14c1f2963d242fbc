"""Calibration windows: `nsamples` fixed-length token windows (no padding) drawn with a seeded generator."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.pruning.config import NAMED_SETS, CalibrationConfig
from core.pruning.errors import CalibrationError
from core.pruning.texts import parse_documents

TOKEN_FILES = (".pt", ".npy")


@dataclass
class Calibration:
    tokens: torch.Tensor  # int64 [nsamples, seqlen]
    protocol: dict[str, Any]  # what was actually used, recorded with every result


def build(cfg: CalibrationConfig, tokenizer: Any, max_positions: int | None) -> Calibration:
    seqlen = min(cfg.seqlen, max_positions) if max_positions else cfg.seqlen
    protocol: dict[str, Any] = {
        "source": "inline" if cfg.texts is not None else cfg.source,
        "nsamples": cfg.nsamples,
        "seqlen": seqlen,
        "seqlen_requested": cfg.seqlen,
        "seed": cfg.seed,
        "sampling": "random windows of one joined, once-tokenised text",
        "padding": False,
    }
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.texts is not None:
        ids = _tokenize("\n\n".join(cfg.texts), tokenizer)
        return Calibration(_windows(ids, cfg.nsamples, seqlen, gen, "the inline texts"), protocol)
    src = cfg.source
    if src in NAMED_SETS:
        texts = load_named(src, "train")
        if src == "c4":  # reference recipe: a random document longer than seqlen, a random window in it
            protocol["sampling"] = "random window of a random c4 document longer than seqlen"
            return Calibration(_c4_windows(texts, tokenizer, cfg.nsamples, seqlen, gen), protocol)
        ids = _tokenize("\n\n".join(texts), tokenizer)
        return Calibration(_windows(ids, cfg.nsamples, seqlen, gen, src), protocol)
    path = Path(src).expanduser()
    if not path.is_file():
        raise CalibrationError(
            f"calibration source {src!r} is neither a named set ({', '.join(NAMED_SETS)}) nor an existing file"
        )
    protocol["source"] = str(path)
    if path.suffix in TOKEN_FILES:
        ids = _load_token_ids(path)
        if ids.dim() == 2:  # pre-tokenised windows are used exactly as given, for like-for-like comparisons
            if ids.shape[1] < seqlen:
                raise CalibrationError(
                    f"{path.name} holds windows of {ids.shape[1]} tokens, fewer than seqlen {seqlen}"
                )
            protocol.update(
                sampling="pre-tokenised windows used as given (first nsamples rows, first seqlen tokens)",
                nsamples=min(cfg.nsamples, ids.shape[0]),
            )
            return Calibration(ids[: cfg.nsamples, :seqlen].contiguous(), protocol)
        protocol["sampling"] = "random windows of a pre-tokenised id sequence"
        return Calibration(_windows(ids, cfg.nsamples, seqlen, gen, path.name), protocol)
    ids = _tokenize("\n\n".join(read_texts(path)), tokenizer)
    return Calibration(_windows(ids, cfg.nsamples, seqlen, gen, path.name), protocol)


def read_texts(path: Path) -> list[str]:
    """Documents of a .jsonl file (one per line) or of any other text file (the whole file)."""
    try:
        return parse_documents(path.read_text(encoding="utf-8"), jsonl=path.suffix == ".jsonl")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path.name} is not UTF-8 text: {e}") from e
    except ValueError as e:
        raise CalibrationError(f"{path.name} {e}") from e


def _load_token_ids(path: Path) -> torch.Tensor:
    try:
        t = (
            torch.load(path, map_location="cpu", weights_only=True)
            if path.suffix == ".pt"
            else torch.from_numpy(np.load(path, allow_pickle=False))
        )
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise CalibrationError(f"cannot read token ids from {path.name}: {e}") from e
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or t.is_floating_point() or t.is_complex():
        raise CalibrationError(f"{path.name} must hold a 1-D or 2-D integer tensor of token ids")
    return t.long()


def _tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids[0]
    return ids


def _windows(ids: torch.Tensor, n: int, seqlen: int, gen: torch.Generator, what: str) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise CalibrationError(
            f"{what} gives {ids.numel()} tokens, not more than seqlen={seqlen}: add text or lower seqlen"
        )
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _c4_windows(docs: list[str], tokenizer: Any, n: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    out: list[torch.Tensor] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        ids = _tokenize(docs[int(torch.randint(len(docs), (1,), generator=gen))], tokenizer)
        if ids.numel() > seqlen:
            s = int(torch.randint(0, ids.numel() - seqlen, (1,), generator=gen))
            out.append(ids[s : s + seqlen])
    if len(out) < n:
        raise CalibrationError(f"too few c4 documents longer than seqlen={seqlen}")
    return torch.stack(out)


# ------------------------------------------------------------------------------------- named sets

_HUB = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}),
    "ptb": (("ptb_text_only", "penn_treebank"), {}),
    "c4": (
        ("allenai/c4",),
        {
            "data_files": {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }
        },
    ),
}
_FIELD = {"wikitext2": "text", "ptb": "sentence", "c4": "text"}


def load_named(name: str, split: str) -> list[str]:
    """Named sets through `datasets`; fails fast (no long retries) when the hub is out of reach."""
    hint = "pass a local file instead, e.g. --calibration corpus.txt (or .jsonl, .pt/.npy token ids)"
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(f"named set {name!r} needs the `datasets` package ({e}); {hint}") from e
    cached_only = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not cached_only and not _reachable("huggingface.co"):
        raise CalibrationError(f"cannot load named set {name!r}: huggingface.co is not reachable; {hint}")
    args, kw = _HUB[name]
    try:
        ds = datasets.load_dataset(*args, split=split, **kw)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for network and cache misses
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"cannot load named set {name!r}: {why}; {hint}") from e
    return [t for t in ds[_FIELD[name]] if t]


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
