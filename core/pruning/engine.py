"""The block-wise engine: for each block (walked by core/pruning/walk.py) collect statistics from its linears'
inputs, prune them, and pass the pruned block's outputs on to the next block."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.pruning import models, patterns
from core.pruning.checkpoints import Checkpoints, Finished
from core.pruning.errors import Cancelled
from core.pruning.masks import pack_mask
from core.pruning.memory import release_freed_memory, spill_to_file
from core.pruning.methods import Method, Pruned, Stats, Target
from core.pruning.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from core.pruning.shared_inputs import SharedInputs
from core.pruning.streaming import BlockStream
from core.pruning.walk import BlockInputs, hooked, on_device, walk_blocks

log = logging.getLogger(__name__)


def sequential_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """Layers that read the same input tensor form a group, in call order: for Llama [q,k,v] → [o] →
    [gate,up] → [down]. Found by running one batch, so no architecture is hard-coded."""
    shared = SharedInputs()
    one = BlockInputs(inputs.hidden[:1], inputs.extra, inputs.index_of)
    with torch.no_grad(), hooked(layers, shared.see):
        one.run(block, keep=False)
    groups = shared.groups()
    missed = [n for n in layers if n not in shared.first_reader]
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
    one statistic (one Hessian instead of three). Sharing is decided on the first batch."""

    def __init__(self, method: Method, layers: dict[str, nn.Module], device: torch.device):
        self.method, self.layers, self.device = method, layers, device
        self.sharing = SharedInputs()
        self.owner = self.sharing.first_reader  # layer -> the layer whose statistic it uses (filled by `see`)
        self.stats: dict[str, Stats] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:
            if self.sharing.see(name, x) == name:
                stats = self.method.stats(models.in_features(self.layers[name]), self.device)
                assert stats is not None, f"{self.method.name} collects no statistics"
                self.stats[name] = stats
            if len(self.owner) == len(self.layers):
                self.sharing.release()
        if self.owner[name] == name:
            self.stats[name].add_batch(x)

    def per_layer(self) -> dict[str, Stats | None]:
        return {n: self.stats[self.owner[n]] if n in self.owner else None for n in self.layers}


def _collect(
    method: Method,
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: BlockInputs,
    device: torch.device,
    keep_outputs: bool,
) -> tuple[dict[str, Stats | None], list[torch.Tensor] | None]:
    """Statistics of the layers' inputs; with keep_outputs the whole block runs and its outputs come back."""
    collector = SharedStats(method, layers, device)
    outs = None
    if keep_outputs:
        with hooked(layers, collector.add):
            outs = inputs.run(block)
    else:
        inputs.collect(block, layers, collector.add)
    return collector.per_layer(), outs


def _share_groups(
    names: list[str], stats: dict[str, Stats | None], targets: dict[str, Target], alone: bool = False
) -> list[list[str]]:
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


def _write_back(
    layer: nn.Module, res: Pruned, name: str, t: Target, masks: dict[str, torch.Tensor], shapes: dict[str, list[int]]
) -> LayerReport:
    """Store the pruned weight in the layer, its packed mask, and report what was achieved."""
    models.set_weight(layer, res.weight)
    stored = res.mask if isinstance(layer, nn.Linear) else res.mask.t()
    masks[f"{name}.weight"], shapes[f"{name}.weight"] = pack_mask(~stored.cpu()), list(stored.shape)
    rows, cols = res.weight.shape
    return LayerReport(
        name=name,
        shape=(rows, cols),
        target=t.sparsity,
        pattern=f"{t.nm[0]}:{t.nm[1]}" if t.nm else None,
        sparsity=patterns.sparsity(models.get_weight(layer)),
        info=res.info,
    )


def _targets(
    block: nn.Module,
    full_name: str,
    sparsity: float,
    nm: tuple[int, int] | None,
    exclude: list[str],
    overrides: dict[str, float],
) -> dict[str, Target]:
    """What each prunable layer of the block is pruned to; layers excluded or left dense are absent."""
    targets = {}
    for n in models.prunable_layers(block):
        full = f"{full_name}.{n}"
        if not models.select([full], exclude):
            continue
        ov = models.override_for(full, overrides)
        t = Target(ov) if ov is not None else Target(sparsity, nm)
        if t.nm is not None or t.sparsity > 0:
            targets[n] = t
    return targets


def prune_blocks(
    model: nn.Module,
    tokens: torch.Tensor,
    method: Method,
    *,
    device: torch.device,
    block_sparsity: list[float],
    nm: tuple[int, int] | None,
    exclude: list[str],
    overrides: dict[str, float],
    true_sequential: bool = False,
    propagate: str = "pruned",
    batch_size: int = 1,
    on_progress: ProgressFn = no_progress,
    should_stop: StopFn = never_stop,
    spill_dir: Path | None = None,
    stream: BlockStream | None = None,
    checkpoints: Checkpoints | None = None,
    finished: Finished | None = None,
) -> EngineResult:
    """With spill_dir, each block's packed masks are written there once the block is done and kept mapped
    from those files rather than in memory (the caller removes the directory after use).

    With stream, each finished block's weights and masks are written to a shard of their own and mapped back
    from it (core/pruning/streaming.py), so finished blocks leave memory; with checkpoints as well, each such
    shard is also checkpointed for a later attempt (checkpoints.dir must be the stream's directory).
    finished: blocks 0..k-1 an earlier attempt checkpointed; they are restored from their shards instead of
    pruned, and the inputs of block k are the checkpointed outputs of block k-1 or, when there are none, are
    rebuilt by running the restored blocks forward."""
    prefix, blocks = models.find_blocks(model)
    if len(block_sparsity) != len(blocks):
        raise ValueError(f"{len(block_sparsity)} block sparsities given for {len(blocks)} blocks")
    if (checkpoints is not None or finished is not None) and stream is None:
        raise ValueError("checkpoints and finished blocks need a stream")
    if finished is not None and len(finished) > len(blocks):
        raise ValueError(f"{len(finished)} finished blocks for a model of {len(blocks)}")
    reports: list[LayerReport] = []
    masks: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    skipped: list[str] = []
    block_masks: dict[int, dict[str, torch.Tensor]] = {}  # a pruned block's packed masks, until it is finished
    walking: list[BlockInputs] = []  # the walk's inputs, for the checkpoint of a finished block's outputs

    def restore(i: int, block: nn.Module, inputs: BlockInputs) -> bool:
        """Block i, when an earlier attempt finished it: its pruned weights and masks from its shard, and the
        next block's inputs (checkpointed, or the restored block run forward)."""
        if finished is None or i >= len(finished):
            return False
        if should_stop():
            raise Cancelled(f"stopped before block {i}")
        shard, rec, k = finished.shards[i], finished.records[i], len(finished)
        rebuild = finished.inputs is None and k < len(blocks)
        with torch.no_grad():
            if rebuild and propagate == "dense":  # the next block reads the dense block's outputs
                with on_device(block, device):
                    inputs.advance(block)
            restored = BlockStream.restore(shard, block)
            if rebuild and propagate != "dense":
                with on_device(block, device):
                    inputs.advance(block)
                restored = BlockStream.restore(shard, block)  # off the device: mapped from the shard again
        if i == k - 1 and finished.inputs is not None and k < len(blocks):
            inputs.hidden = [h.to(device) for h in finished.inputs]
        masks.update(restored)
        shapes.update(rec["mask_shapes"])
        reports.extend(LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in rec["layers"])
        skipped.extend(rec["skipped"])
        release_freed_memory()
        on_progress(
            Progress("prune", f"block {i + 1}/{len(blocks)} (restored)", block=i, total_blocks=len(blocks), data={})
        )
        return True

    def prune_block(i: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor] | None:
        """Prune the block in place; returns its dense outputs when those are what the next block reads."""
        walking[:] = [inputs]
        targets = _targets(block, f"{prefix}.{i}", block_sparsity[i], nm, exclude, overrides)
        layers = {n: m for n, m in block.named_modules() if n in targets}
        masks_of_block: dict[str, torch.Tensor] = {}
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
                reports.extend(
                    _write_back(layers[n], r, f"{prefix}.{i}.{n}", targets[n], masks_of_block, shapes)
                    for n, r in zip(names, results, strict=True)
                )
                del results
                for n in names:  # a statistic (and its factorisation) goes once its last layer is pruned
                    stats[n] = None
                release_freed_memory()  # so that the transients of successive groups do not pile up
            del stats
        block_masks[i] = masks_of_block
        return dense_out if propagate == "dense" else None

    def finish_block(i: int) -> None:
        """Once the next block's inputs are made: the block's masks out of memory, then its progress."""
        done_masks = block_masks.pop(i)
        mine = [r for r in reports if r.name.startswith(f"{prefix}.{i}.")]
        if stream is not None:
            shard, sha, mapped = stream.finish(i, blocks[i], done_masks)
            masks.update(mapped)
            if checkpoints is not None:
                checkpoints.save(
                    i,
                    len(blocks),
                    shard,
                    sha,
                    layers=[{**r.__dict__, "shape": list(r.shape)} for r in mine],
                    skipped=[n for n in skipped if n.startswith(f"{prefix}.{i}.")],
                    shapes={n: shapes[n] for n in mapped},
                    next_inputs=walking[0].hidden if walking else None,
                )
        else:
            masks.update(
                spill_to_file(done_masks, spill_dir / f"masks-{i:05d}.safetensors") if spill_dir else done_masks
            )
        del done_masks
        release_freed_memory()
        done = {r.name: r.sparsity for r in mine}
        on_progress(
            Progress("prune", f"block {i + 1}/{len(blocks)}", block=i, total_blocks=len(blocks), data={"layers": done})
        )

    walk_blocks(
        model,
        tokens,
        prune_block,
        device=device,
        batch_size=batch_size,
        should_stop=should_stop,
        after=finish_block,
        restore=restore if finished is not None else None,
    )
    return EngineResult(reports, masks, shapes, skipped)
