"""The block walk every pass over the model shares: capture what enters the first block, then visit the blocks
in order, each on the compute device in turn, and feed each block's outputs to the next.

Pruning feeds on the pruned block's outputs (errors propagate, as in the papers); the scoring pre-passes (OWL,
structured) return the dense outputs their own pass computed. Only the current block and the calibration
activations sit on the compute device."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.pruning import models
from core.pruning.errors import Cancelled, InvalidModelError
from core.pruning.progress import StopFn, never_stop


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


def capture(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, device: torch.device, batch_size: int
) -> BlockInputs:
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
def hooked(layers: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], object]) -> Iterator[None]:
    """Call fn(name, input) on every forward of each layer (what fn returns is dropped)."""

    def hook(name: str, inp: tuple) -> None:  # a forward hook's return value would replace the layer's output
        fn(name, inp[0].detach())

    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: hook(n, inp)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# visit(i, block, inputs) -> the block's outputs when the visit already computed the ones to pass on, else None
Visit = Callable[[int, nn.Module, BlockInputs], list[torch.Tensor] | None]


def walk_blocks(
    model: nn.Module,
    tokens: torch.Tensor,
    visit: Visit,
    *,
    device: torch.device,
    batch_size: int,
    should_stop: StopFn = never_stop,
    after: Callable[[int], None] | None = None,
    restore: Callable[[int, nn.Module, BlockInputs], bool] | None = None,
) -> None:
    """Capture the first block's inputs from calibration windows `tokens` [n, seqlen] (batches of batch_size),
    then for each block: stop if asked (Cancelled), move the block to the device, call visit(i, block, inputs)
    and make the next block's inputs, which are the outputs the visit returns or, when it returns None, those
    of the block as the visit left it (pruned), run again. after(i), if given, runs once block i is done and
    back off the device. restore(i, block, inputs), if given, is asked first: when it returns True block i was
    done by an earlier attempt and restore has made the next block's inputs itself (no visit, no after)."""
    _, blocks = models.find_blocks(model)
    inputs = capture(model, blocks, tokens, device, batch_size)
    for i, block in enumerate(blocks):
        if restore is not None and restore(i, block, inputs):
            continue
        if should_stop():
            raise Cancelled(f"stopped before block {i}")
        with torch.no_grad(), on_device(block, device):
            outs = visit(i, block, inputs)
            if i == len(blocks) - 1:
                inputs.hidden = []  # nothing reads the last block's outputs
            elif outs is not None:
                inputs.hidden = outs
            else:
                inputs.advance(block)
        if after is not None:
            after(i)
