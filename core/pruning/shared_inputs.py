"""Which layers of a block read the very same input tensor (q/k/v one normed hidden state, gate/up another).

Found by watching one forward pass, so no architecture is hard-coded: two inputs are the same tensor when they
share storage address, shape and strides. Every tensor that opened a group is held until `release()`, so that
no later tensor can be allocated at its address and pass for it."""

from __future__ import annotations

import torch


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class SharedInputs:
    """Call `see(name, x)` for every input a layer receives; a layer's first input places it."""

    def __init__(self) -> None:
        self.first_reader: dict[str, str] = {}  # layer -> the first layer, in call order, that read its input
        self._held: list[tuple[torch.Tensor, str]] = []

    def see(self, name: str, x: torch.Tensor) -> str:
        """Record that layer `name` read x; returns the first layer that read the same tensor (`name` itself
        when x is new)."""
        if name not in self.first_reader:
            src = next((n for t, n in self._held if _same_tensor(t, x)), None)
            if src is None:
                self._held.append((x, name))
            self.first_reader[name] = src or name
        return self.first_reader[name]

    def groups(self) -> list[list[str]]:
        """Layers grouped by the input they read, groups and members in call order."""
        by_input: dict[str, list[str]] = {}
        for name, src in self.first_reader.items():
            by_input.setdefault(src, []).append(name)
        return list(by_input.values())

    def release(self) -> None:
        """Let go of the held inputs (once every layer of interest has been placed)."""
        self._held.clear()
