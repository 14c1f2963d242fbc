"""The block-wise engine: capture what enters the first block, then for each block collect statistics
from its linears' inputs, prune them, and pass the (pruned) block's outputs on to the next block.

Only the current block and the calibration activations sit on the compute device."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.pruning import models
from core.pruning.errors import Cancelled, InvalidModelError
from core.pruning.masks import pack_mask
from core.pruning.methods import Method, Target
from core.pruning.progress import Progress, ProgressFn, StopFn, never_stop, no_progress


class _Captured(Exception):
    pass


def _to(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside args/kwargs (tuples, lists, dicts, e.g. rotary (cos, sin)) to a device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """Hidden states per batch, plus the extra args/kwargs the model passes to every block.

    Windows have one length and no padding, so masks, position ids and rotary embeddings are the same for
    every batch of a given size: they are captured once per batch size instead of once per batch."""

    hidden: list[torch.Tensor]
    extra: dict[int, tuple[tuple, dict]] = field(default_factory=dict)

    def run(self, block: nn.Module, keep: bool = True) -> list[torch.Tensor]:
        outs = []
        for h in self.hidden:
            args, kwargs = self.extra[h.shape[0]]
            o = _first(block(h, *args, **kwargs))
            if keep:
                outs.append(o)
        return outs

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def capture(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, device: torch.device,
            batch_size: int) -> BlockInputs:
    """Run the model up to its first block for every batch of calibration windows and keep what enters it."""
    models.move_outside_blocks(model, blocks, device)
    hidden: list[torch.Tensor] = []
    extra: dict[int, tuple[tuple, dict]] = {}

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        if h.shape[0] not in extra:
            kw = {k: v for k, v in kwargs.items() if k not in ("output_attentions",)}
            extra[h.shape[0]] = (_to(args[1:], device), _to(kw, device))
        raise _Captured

    hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in tokens.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    pass
                else:
                    raise InvalidModelError("the model's forward never reached its first block")
    finally:
        hook.remove()
        models.move_outside_blocks(model, blocks, torch.device("cpu"))
    return BlockInputs(hidden, extra)


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    block.to(device)
    try:
        yield block
    finally:
        if device.type != "cpu":
            block.to("cpu")


@contextmanager
def hooked(layers: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(name, input) on every forward of each layer."""
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: fn(n, inp[0].detach()))
               for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sequential_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """Layers that read the same input tensor form a group, in call order: for Llama [q,k,v] → [o] →
    [gate,up] → [down]. Found by running one batch, so no architecture is hard-coded."""
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def record(name: str, x: torch.Tensor) -> None:
        for t, names in seen:
            if t.data_ptr() == x.data_ptr() and t.shape == x.shape:
                if name not in names:
                    names.append(name)
                return
        if not any(name in names for _, names in seen):
            seen.append((x, [name]))  # keeps x alive, so its memory is not reused by a later input

    one = BlockInputs(inputs.hidden[:1], inputs.extra)
    with torch.no_grad(), hooked(layers, record):
        one.run(block, keep=False)
    groups = [names for _, names in seen]
    missed = [n for n in layers if not any(n in g for g in groups)]
    return groups + ([missed] if missed else [])


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    target: float
    pattern: str | None
    sparsity: float
    info: dict[str, Any]


@dataclass
class EngineResult:
    layers: list[LayerReport]
    masks: dict[str, torch.Tensor]  # parameter name -> packed keep-bits in the weight's storage layout
    mask_shapes: dict[str, list[int]]


def prune_blocks(model: nn.Module, tokens: torch.Tensor, method: Method, *, device: torch.device,
                 block_sparsity: list[float], nm: tuple[int, int] | None, exclude: list[str],
                 overrides: dict[str, float], true_sequential: bool = False, propagate: str = "pruned",
                 batch_size: int = 1, on_progress: ProgressFn = no_progress,
                 should_stop: StopFn = never_stop) -> EngineResult:
    prefix, blocks = models.find_blocks(model)
    if len(block_sparsity) != len(blocks):
        raise ValueError(f"{len(block_sparsity)} block sparsities given for {len(blocks)} blocks")
    inputs = capture(model, blocks, tokens, device, batch_size)
    reports: list[LayerReport] = []
    masks: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        if should_stop():
            raise Cancelled(f"stopped before block {i}")
        targets = {}
        for n in models.prunable_layers(block):
            full = f"{prefix}.{i}.{n}"
            if not models.select([full], exclude):
                continue
            ov = models.override_for(full, overrides)
            t = Target(ov) if ov is not None else Target(block_sparsity[i], nm)
            if t.nm is not None or t.sparsity > 0:
                targets[n] = t
        layers = {n: m for n, m in block.named_modules() if n in targets}
        with torch.no_grad(), on_device(block, device):
            groups = sequential_groups(block, layers, inputs) if true_sequential and layers else [list(layers)]
            collects = method.needs_inputs and bool(groups[0])
            dense_out = inputs.run(block) if propagate == "dense" and not collects else None
            for g, group in enumerate(groups):
                stats = {n: method.stats(models.in_features(layers[n]), device) for n in group}
                if method.needs_inputs and group:
                    keep = propagate == "dense" and g == 0  # the first pass sees the dense block
                    with hooked({n: layers[n] for n in group}, lambda n, x: stats[n].add_batch(x)):
                        outs = inputs.run(block, keep=keep)
                    dense_out = outs if keep else dense_out
                for n in group:
                    layer = layers[n]
                    w = models.get_weight(layer).to(device, torch.float32, copy=True,
                                                    memory_format=torch.contiguous_format)
                    res = method.prune(w, stats.pop(n), targets[n])
                    models.set_weight(layer, res.weight)
                    del w
                    full = f"{prefix}.{i}.{n}.weight"
                    stored = res.mask if isinstance(layer, nn.Linear) else res.mask.t()
                    masks[full], shapes[full] = pack_mask(~stored.cpu()), list(stored.shape)
                    t = targets[n]
                    reports.append(LayerReport(
                        name=f"{prefix}.{i}.{n}", shape=tuple(res.weight.shape),
                        target=t.sparsity, pattern=f"{t.nm[0]}:{t.nm[1]}" if t.nm else None,
                        sparsity=float((models.get_weight(layer) == 0).sum()) / res.weight.numel(),
                        info=res.info))
            inputs.hidden = dense_out if propagate == "dense" else inputs.run(block)
        on_progress(Progress("prune", f"block {i + 1}/{len(blocks)}", block=i, total_blocks=len(blocks),
                             data={"layers": {r.name: r.sparsity for r in reports if r.name.startswith(f"{prefix}.{i}.")}}))
    return EngineResult(reports, masks, shapes)

