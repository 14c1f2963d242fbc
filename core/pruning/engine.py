"""The block-wise engine: capture what enters the first block, then for each block collect statistics
from its linears' inputs, prune them, and pass the (pruned) block's outputs on to the next block.

Only the current block and the calibration activations sit on the compute device."""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.pruning import models, patterns
from core.pruning.errors import Cancelled, InvalidModelError
from core.pruning.masks import pack_mask
from core.pruning.memory import release_freed_memory, spill_to_file
from core.pruning.methods import Method, Pruned, Stats, Target
from core.pruning.progress import Progress, ProgressFn, StopFn, never_stop, no_progress

log = logging.getLogger(__name__)


class _Captured(Exception):
    pass


class _Collected(Exception):
    """Raised from a pre-hook once a batch has delivered every input a statistics pass needs."""


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
    """Hidden states per batch, plus the extra args/kwargs the model passes to each block.

    Windows have one length and no padding, so a block's masks, position ids and rotary embeddings are the
    same for every batch of a given size: they are recorded once per (block, batch size). They are recorded
    per block because models that mix attention types (sliding/global) pass each block its own mask."""

    hidden: list[torch.Tensor]
    extra: dict[tuple[int, int], tuple[tuple, dict]] = field(default_factory=dict)
    index_of: dict[int, int] = field(default_factory=dict)  # id(block) -> its position when captured

    def _call(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.extra[(self.index_of[id(block)], h.shape[0])]
        return _first(block(h, *args, **kwargs))

    def run(self, block: nn.Module, keep: bool = True) -> list[torch.Tensor]:
        outs = []
        for h in self.hidden:
            o = self._call(block, h)
            if keep:
                outs.append(o)
        return outs

    def advance(self, block: nn.Module) -> None:
        """Replace every batch by the block's output, one batch at a time, so inputs and outputs of the
        whole calibration set are never resident together."""
        for j, h in enumerate(self.hidden):
            self.hidden[j] = self._call(block, h)
            del h

    def collect(self, block: nn.Module, layers: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Call fn(name, input) for every input the given layers receive, running each batch only as far as
        it must: the first batch runs the whole block and counts the calls; a later batch stops once it has
        made as many and every layer has had its input (a statistics pass never needs what follows, e.g.
        down_proj's product). A batch that routes differently (mixture-of-experts) simply runs to the end."""
        calls, seen, expected = 0, set(), None

        def hook(name: str, args: tuple) -> None:
            nonlocal calls
            fn(name, args[0].detach())
            calls += 1
            seen.add(name)
            if calls == expected and len(seen) == len(layers):
                raise _Collected

        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, args)) for n, m in layers.items()]
        try:
            for h in self.hidden:
                calls, seen = 0, set()
                try:
                    self._call(block, h)
                except _Collected:
                    continue
                if expected is None and len(seen) == len(layers):
                    expected = calls
        finally:
            for hd in handles:
                hd.remove()


def _accepts(fn: Any, name: str) -> bool:
    """Whether fn takes keyword `name` (older encoders' forward has no use_cache and no **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    h = args[0] if args else kwargs["hidden_states"]
    kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "output_attentions")}
    return h, args[1:], kw


def capture(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, device: torch.device,
            batch_size: int) -> BlockInputs:
    """Run the model up to its first block for every batch of calibration windows and keep what enters it;
    then record the arguments each block receives, running the model once per batch size with every block
    replaced by a cheap recorder (so no block needs to be on the device)."""
    models.move_outside_blocks(model, blocks, device)
    hidden: list[torch.Tensor] = []
    first: dict[int, tuple[tuple, dict]] = {}

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        h, a, kw = _split_hidden(args, kwargs)
        hidden.append(h.detach())
        first.setdefault(h.shape[0], (_to(a, device), _to(kw, device)))
        raise _Captured

    no_cache = {"use_cache": False} if _accepts(model.forward, "use_cache") else {}

    def forward(batch: torch.Tensor) -> None:
        try:
            model(input_ids=batch.to(device), **no_cache)
        except _Captured:
            return
        raise InvalidModelError("the model's forward never reached its first block")

    extra: dict[tuple[int, int], tuple[tuple, dict]] = {}
    try:
        with torch.no_grad():
            hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                batches = tokens.split(batch_size)
                for batch in batches:
                    forward(batch)
            finally:
                hook.remove()
            # does a block return a tensor (transformers 5) or a tuple (4.x)? Ask block 0 once.
            b0 = hidden[0].shape[0]
            with on_device(blocks[0], device):
                as_tuple = isinstance(blocks[0](hidden[0], *first[b0][0], **first[b0][1]), tuple)

            def recorder(i: int):
                def fwd(*args: Any, **kwargs: Any) -> Any:
                    h, a, kw = _split_hidden(args, kwargs)
                    extra[(i, h.shape[0])] = (_to(a, device), _to(kw, device))
                    if i == len(blocks) - 1:
                        raise _Captured  # nothing after the last block is needed
                    return (h,) if as_tuple else h
                return fwd

            for i, blk in enumerate(blocks):
                blk.forward = recorder(i)
            try:
                for size in sorted({h.shape[0] for h in hidden}):
                    forward(next(b for b in batches if b.shape[0] == size))
            finally:
                for blk in blocks:
                    del blk.forward
    finally:
        models.move_outside_blocks(model, blocks, torch.device("cpu"))
    return BlockInputs(hidden, extra, {id(b): i for i, b in enumerate(blocks)})


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    models.move(block, device)
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

    one = BlockInputs(inputs.hidden[:1], inputs.extra, inputs.index_of)
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
    skipped: list[str] = field(default_factory=list)  # layers whose forward never ran on calibration data


class SharedStats:
    """Statistics of a group of layers; layers that read the very same input tensor (q/k/v, gate/up) share
    one statistic (one Hessian instead of three). Sharing is decided on the first batch, while the inputs
    seen are kept alive so that no later tensor can reuse their memory address."""

    def __init__(self, method: Method, layers: dict[str, nn.Module], device: torch.device):
        self.method, self.layers, self.device = method, layers, device
        self.owner: dict[str, str] = {}
        self.stats: dict[str, Stats] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []

    def add(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:
            src = next((n for t, n in self._seen if t.data_ptr() == x.data_ptr() and t.shape == x.shape
                        and t.stride() == x.stride()), None)
            self.owner[name] = src or name
            if src is None:
                self.stats[name] = self.method.stats(models.in_features(self.layers[name]), self.device)
                self._seen.append((x, name))
            if len(self.owner) == len(self.layers):
                self._seen.clear()
        if self.owner[name] == name:
            self.stats[name].add_batch(x)

    def per_layer(self) -> dict[str, Stats | None]:
        return {n: self.stats[self.owner[n]] if n in self.owner else None for n in self.layers}


def _collect(method: Method, block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs,
             device: torch.device, keep_outputs: bool) -> tuple[dict[str, Stats | None], list[torch.Tensor] | None]:
    """Statistics of the layers' inputs; with keep_outputs the whole block runs and its outputs come back."""
    collector = SharedStats(method, layers, device)
    outs = None
    if keep_outputs:
        with hooked(layers, collector.add):
            outs = inputs.run(block)
    else:
        inputs.collect(block, layers, collector.add)
    return collector.per_layer(), outs


def _share_groups(names: list[str], stats: dict[str, Stats | None], targets: dict[str, Target],
                  alone: bool = False) -> list[list[str]]:
    """Layers pruned in one call: same statistic object and same target (q/k/v, gate/up); others alone.
    With `alone` every layer is its own call (nothing to gain from stacking, and less held at once)."""
    if alone:
        return [[n] for n in names]
    groups: dict[tuple[int | str, Target], list[str]] = {}
    for n in names:
        groups.setdefault((id(stats[n]) if stats[n] is not None else n, targets[n]), []).append(n)
    return list(groups.values())


def _weight_to_prune(layer: nn.Module, method: Method, device: torch.device) -> torch.Tensor:
    """[out, in]: the layer's own weight for methods that only mask it or copy it themselves, else a float32
    copy to update."""
    w = models.get_weight(layer)
    if method.masks_only or method.copies_weights:
        return w
    return w.to(device, torch.float32, copy=True, memory_format=torch.contiguous_format)


def _write_back(layer: nn.Module, res: Pruned, name: str, t: Target, masks: dict[str, torch.Tensor],
                shapes: dict[str, list[int]]) -> LayerReport:
    """Store the pruned weight in the layer, its packed mask, and report what was achieved."""
    models.set_weight(layer, res.weight)
    stored = res.mask if isinstance(layer, nn.Linear) else res.mask.t()
    masks[f"{name}.weight"], shapes[f"{name}.weight"] = pack_mask(~stored.cpu()), list(stored.shape)
    return LayerReport(name=name, shape=tuple(res.weight.shape), target=t.sparsity,
                       pattern=f"{t.nm[0]}:{t.nm[1]}" if t.nm else None,
                       sparsity=patterns.sparsity(models.get_weight(layer)), info=res.info)


def prune_blocks(model: nn.Module, tokens: torch.Tensor, method: Method, *, device: torch.device,
                 block_sparsity: list[float], nm: tuple[int, int] | None, exclude: list[str],
                 overrides: dict[str, float], true_sequential: bool = False, propagate: str = "pruned",
                 batch_size: int = 1, on_progress: ProgressFn = no_progress,
                 should_stop: StopFn = never_stop, spill_dir: Path | None = None) -> EngineResult:
    """With spill_dir, each block's packed masks are written there once the block is done and kept mapped
    from those files rather than in memory (the caller removes the directory after use)."""
    prefix, blocks = models.find_blocks(model)
    if len(block_sparsity) != len(blocks):
        raise ValueError(f"{len(block_sparsity)} block sparsities given for {len(blocks)} blocks")
    inputs = capture(model, blocks, tokens, device, batch_size)
    reports: list[LayerReport] = []
    masks: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    skipped: list[str] = []
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
        block_masks: dict[str, torch.Tensor] = {}
        with torch.no_grad(), on_device(block, device):
            groups = sequential_groups(block, layers, inputs) if true_sequential and layers else [list(layers)]
            collects = method.needs_inputs and bool(groups[0])
            dense_out = inputs.run(block) if propagate == "dense" and not collects else None
            for g, group in enumerate(groups):
                stats: dict[str, Stats | None] = {n: None for n in group}
                if method.needs_inputs and group:
                    keep = propagate == "dense" and g == 0  # the first pass sees the dense block: keep its outputs
                    stats, outs = _collect(method, block, {n: layers[n] for n in group}, inputs, device, keep)
                    dense_out = outs if keep else dense_out
                    release_freed_memory()  # the pass's temporaries, before pruning allocates its own
                live = []
                for n in group:
                    if method.needs_inputs and stats[n] is None:
                        log.warning("%s.%d.%s received no calibration input; left unpruned", prefix, i, n)
                        skipped.append(f"{prefix}.{i}.{n}")
                    else:
                        live.append(n)
                models.own_weights([layers[n] for n in live])  # written next: out of the checkpoint's mapping
                for names in _share_groups(live, stats, targets, method.masks_only):
                    ws = [_weight_to_prune(layers[n], method, device) for n in names]
                    results = method.prune_many(ws, stats[names[0]], targets[names[0]])
                    del ws
                    reports.extend(_write_back(layers[n], r, f"{prefix}.{i}.{n}", targets[n], block_masks, shapes)
                                   for n, r in zip(names, results))
                    del results
                    for n in names:  # a statistic (and its factorisation) goes once its last layer is pruned
                        stats[n] = None
                    release_freed_memory()  # so that the transients of successive groups do not pile up
                del stats
            if i == len(blocks) - 1:
                inputs.hidden = []  # nothing reads the last block's outputs
            elif propagate == "dense":
                inputs.hidden = dense_out
            else:
                inputs.advance(block)
        masks.update(spill_to_file(block_masks, spill_dir / f"masks-{i:05d}.safetensors") if spill_dir else block_masks)
        del block_masks
        release_freed_memory()
        done = {r.name: r.sparsity for r in reports if r.name.startswith(f"{prefix}.{i}.")}
        on_progress(Progress("prune", f"block {i + 1}/{len(blocks)}", block=i, total_blocks=len(blocks),
                             data={"layers": done}))
    return EngineResult(reports, masks, shapes, skipped)

