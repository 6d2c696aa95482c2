"""The float stream: one decoder block run with its float weights over the float model's hidden
states, recording the inputs of the targets whose modifier ``needs_float_inputs``
(:class:`FloatInputs`), so the quantized pass can pair each of its input rows with the float
model's rows for the same tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .calls import Call, call_block, check_batch_finite
from .engines import sample_rows
from .hooks import HookRegistry
from .modifiers.base import Target

__all__ = ["FloatInputs", "float_pass"]


class FloatInputs:
    """One block's float input rows per target, keyed by sample and by the module's call
    number in that sample's forward (a module may run twice in a block). Rows are views of the
    tensor the module received, so modules fed the very same tensor (q/k/v, gate/up) hold one
    copy; they live as long as this object: the block's calibration."""

    def __init__(self) -> None:
        self._rows: dict[tuple[Any, ...], torch.Tensor] = {}
        self._calls: dict[int, int] = {}  # per target: its calls in the current block call
        self.first, self.count = 0, 1
        self.lengths: list[int] | None = None

    def start_call(self, first: int, count: int, lengths: list[int] | None) -> None:
        """A block call over samples ``first .. first + count - 1`` begins."""
        self.first, self.count, self.lengths = first, count, lengths
        self._calls.clear()

    def record(self, t: Target, x: torch.Tensor) -> None:
        k = self._calls.get(id(t), 0)
        self._calls[id(t)] = k + 1
        rows = sample_rows(x, self.count, self.lengths)
        if len(rows) == self.count:
            for j, r in enumerate(rows):
                self._rows[(id(t), self.first + j, k)] = r
        else:  # not split by sample (e.g. the tokens routed to an MoE expert)
            self._rows[(id(t), "all", self.first, self.count, k)] = rows[0]

    def take(self, t: Target, first: int, call: int, quant_rows: list[torch.Tensor],
             count: int, label: str) -> list[torch.Tensor]:
        """The float rows pairing with ``quant_rows``: ``t``'s ``call``-th input for samples
        ``first .. first + count - 1`` in the quantized pass."""
        per = [self._rows.get((id(t), first + j, call)) for j in range(count)]
        floats: list[torch.Tensor] | None = None
        if all(r is not None for r in per):
            floats = per if len(quant_rows) == count else [torch.cat(per)]  # type: ignore[arg-type]
        elif (whole := self._rows.get((id(t), "all", first, count, call))) is not None:
            floats = [whole]
        if floats is None or len(floats) != len(quant_rows) or any(
                f.shape != q.shape for f, q in zip(floats, quant_rows)):
            raise RuntimeError(
                f"layer {t.name!r} ({label}): its inputs in the quantized pass do not pair "
                "with the float model's (other tokens reached it, e.g. a router chose other "
                "experts), so its float-input statistics are undefined")
        return floats


def float_pass(runner: nn.Module, targets: list[Target], hs: list[torch.Tensor],
               cs: list[Call], sizes: list[int], lengths: list[list[int] | None] | None,
               bname: str, hooks: HookRegistry) -> tuple[FloatInputs, list[torch.Tensor]]:
    """Runs ``runner`` (float weights, no activation quantization) over every call ``hs`` /
    ``cs`` (``sizes``: samples per call; ``lengths``: per call, real lengths when right-padded)
    with pre-hooks recording ``targets``' inputs; returns them and the block's outputs."""
    rec = FloatInputs()

    def pre(t: Target) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"layer {t.name!r} was called without a tensor input")
            rec.record(t, x.detach())
        return hook

    for t in targets:
        hooks.pre("float-pass", t.live, pre(t), prepend=True)
    outs = []
    first = 0
    try:
        for s, (h, c) in enumerate(zip(hs, cs)):
            rec.start_call(first, sizes[s], lengths[s] if lengths else None)
            out = call_block(runner, h, c)
            check_batch_finite(out, f"{bname} (float model)", first)
            outs.append(out)
            first += sizes[s]
    finally:
        hooks.remove("float-pass")
    return rec, outs
