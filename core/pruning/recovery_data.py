"""Recovery (fine-tuning) windows: the same kinds of source as calibration (named sets, a local .txt/.jsonl or
token-id file, an uploaded set, inline texts), drawn at seeded random starts of one once-tokenised stream.

When the recovery text is the evaluation's file, the windows come only from the tokens after those the
perplexity scores (evaluation reads non-overlapping windows from the start of the file), so training never
sees an evaluated token; metrics.json says where the split fell."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.pruning.calibration import TOKEN_FILES, _load_token_ids, _tokenize, load_named, read_texts
from core.pruning.config import NAMED_SETS, PruneConfig
from core.pruning.errors import RecoveryDataError


@dataclass
class RecoveryData:
    ids: torch.Tensor  # int64 [tokens]: the stream windows are cut from
    seqlen: int
    batch_size: int
    seed: int
    protocol: dict[str, Any]
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def reset(self, seed: int | None = None) -> None:
        self.gen = torch.Generator().manual_seed(self.seed if seed is None else seed)

    def batch(self) -> torch.Tensor:
        """[batch_size, seqlen] windows at random starts (the next of the seeded sequence)."""
        starts = torch.randint(0, self.ids.numel() - self.seqlen + 1, (self.batch_size,), generator=self.gen)
        return torch.stack([self.ids[s : s + self.seqlen] for s in starts.tolist()])


def source_of(config: PruneConfig) -> tuple[str, list[str] | None]:
    """(what the recovery text is, inline texts or None): its own source or texts, else calibration's."""
    rc = config.recovery
    assert rc is not None
    if rc.texts is not None:
        return "inline", rc.texts
    if rc.source is not None:
        return rc.source, None
    if config.calibration.texts is not None:
        return "inline (calibration texts)", config.calibration.texts
    return config.calibration.source, None


def field_of(config: PruneConfig) -> str:
    """The config field the recovery text comes from (for error messages)."""
    rc = config.recovery
    assert rc is not None
    if rc.texts is not None:
        return "recovery.texts"
    if rc.source is not None:
        return "recovery.source"
    return "calibration.texts" if config.calibration.texts is not None else "calibration.source"


def build(
    config: PruneConfig,
    tokenizer: Any,
    max_positions: int | None,
    eval_scored: tuple[str, torch.Tensor, int] | None = None,
) -> RecoveryData:
    """`eval_scored`: (evaluation source, its token stream, tokens the perplexity scores from its start)."""
    rc = config.recovery
    assert rc is not None
    where = field_of(config)
    seqlen = rc.seqlen or config.calibration.seqlen
    seqlen = min(seqlen, max_positions) if max_positions else seqlen
    src, texts = source_of(config)
    protocol: dict[str, Any] = {
        "source": src,
        "seqlen": seqlen,
        "batch_size": rc.batch_size,
        "seed": rc.seed,
        "sampling": "random windows (seeded, with replacement) of one joined, once-tokenised text",
        "split": "no overlap with evaluation: a different text",
    }
    if texts is not None:
        ids = _tokenize("\n\n".join(texts), tokenizer)
    elif src in NAMED_SETS:
        ids = _tokenize("\n\n".join(load_named(src, "train")), tokenizer)
        protocol["split"] = "train split (evaluation reads the test/validation split)"
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise RecoveryDataError(f"{where}: {src!r} is neither a named set nor an existing file")
        protocol["source"] = str(path)
        if path.suffix in TOKEN_FILES:
            ids = _load_token_ids(path).reshape(-1)
        elif eval_scored is not None and _same_file(path, eval_scored[0]):
            _, ev_ids, scored = eval_scored
            ids = ev_ids[scored:]
            protocol["split"] = (
                f"same file as evaluation: perplexity scores tokens [0, {scored}), recovery windows are drawn from "
                f"tokens [{scored}, {ev_ids.numel()})"
            )
        else:
            ids = _tokenize("\n\n".join(read_texts(path)), tokenizer)
    need = rc.batch_size * seqlen
    if ids.numel() < need:
        hint = (
            " (the evaluated windows come first: set evaluation.max_windows to leave text for training)"
            if "same file" in protocol["split"]
            else ""
        )
        raise RecoveryDataError(
            f"{where}: recovery text gives {ids.numel()} tokens, fewer than one batch "
            f"(recovery.batch_size {rc.batch_size} × seqlen {seqlen} = {need}){hint}"
        )
    protocol["tokens_available"] = int(ids.numel())
    return RecoveryData(ids.long(), seqlen, rc.batch_size, rc.seed, protocol)


def _same_file(path: Path, other: str) -> bool:
    o = Path(other).expanduser()
    try:
        return o.is_file() and path.resolve() == o.resolve()
    except OSError:
        return False
