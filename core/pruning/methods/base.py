"""The one small interface every pruning method implements. A new method is one file in this package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from core.pruning.config import PruneConfig

REGISTRY: dict[str, type[Method]] = {}


class MethodOptions(BaseModel):
    """A method's own settings. Subclass it as `Options` inside the method class: each field is checked by
    PruneConfig (as `method_options`) and becomes a CLI flag, `--<field-name>`, with its description as help.
    Field names are shared by every method (a flag means the same setting whichever method declares it), so
    a name that two methods declare must have the same meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def conflicts(self, config: PruneConfig) -> list[tuple[str, str]]:
        """(option, why) for each setting the rest of `config` contradicts; checked before the model loads."""
        return []

    @classmethod
    def config_rules(cls) -> list[dict[str, Any]]:
        """`conflicts` stated as JSON Schema, which a config choosing this method meets (the published API)."""
        return []


@dataclass(frozen=True)
class Target:
    sparsity: float  # fraction removed (unstructured)
    nm: tuple[int, int] | None = None  # keep at most n of every m consecutive inputs


@dataclass
class Pruned:
    weight: torch.Tensor  # [out, in], zeros where pruned: float32, or the layer's own weight (masks_only)
    mask: torch.Tensor  # bool [out, in], True = removed
    info: dict[str, Any] = field(default_factory=dict)


class Stats:
    """Accumulates what a method needs from a layer's inputs; x is [..., in_features] on the compute device."""

    def add_batch(self, x: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Method:
    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_inputs: ClassVar[bool] = True
    # Only chooses which weights to remove, never updates the rest: prune() then gets the layer's own weight
    # (a view, in the model's dtype) and zeroes it in place, with no float32 copy to make and write back.
    masks_only: ClassVar[bool] = False
    # Updates weights, but makes its float32 working copy itself (in the layout it computes in) from the
    # layers' own weights, which it must not modify: one copy instead of a float32 copy and a re-layout.
    copies_weights: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def __init__(self, config: PruneConfig):
        self.config = config
        # a config for another method (tests build one method from another's config) gives this one its defaults
        given = config.method_options if config.method == self.name else {}
        self.options = self.Options.model_validate(given)

    def stats(self, in_features: int, device: torch.device) -> Stats | None:
        return None

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:  # pragma: no cover
        """w is [out, in]: a float32 copy the method may update and return; for masks_only methods the
        layer's own weight, in which the removed entries are zeroed in place; for copies_weights methods the
        layer's own weight, read only."""
        raise NotImplementedError

    def prune_many(self, ws: list[torch.Tensor], stats: Stats | None, target: Target) -> list[Pruned]:
        """Layers that share one statistic and one target, in order. Methods that can do them together
        (SparseGPT: one sweep over the stacked rows) override this; the weights may be consumed."""
        return [self.prune(w, stats, target) for w in ws]


def tokens_first(x: torch.Tensor) -> torch.Tensor:
    """[..., in] activations as float32 [tokens, in]."""
    return x.reshape(-1, x.shape[-1]).float()
