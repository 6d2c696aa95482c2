"""The two ways a decoder block's calibration pass streams its modules' inputs to the modifiers.

* :class:`OnePass` - the batched path: the block runs ONCE over all samples stacked. A forward
  pre-hook on each target hands the module's input to its modifier (modules fed the very same
  tensor - q/k/v, gate/up - share one statistic) and, for a sequential modifier, quantizes the
  module right there, before it runs: its output is computed with quantized weights, so every
  later module sees all upstream modules quantized (exactly true-sequential) and the block's
  output from this same pass is the next block's input.
* :func:`calibrate_subsets` - the fallback (samples that cannot be stacked, too little memory,
  a module called twice in a block): the block runs sample by sample (or over chunks of
  stacked samples) once per subset of modules, with forward hooks streaming inputs; each pass
  stops as soon as its subset has seen its inputs.

Both give the same statistics sample by sample in the same order. When the block's float
inputs were recorded (:mod:`ferroquant.floats`), both also hand each target's modifier, where it
``needs_float_inputs``, the float rows of the same samples (``Modifier.add_float_pairs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .calls import Call, call_block
from .hooks import HookRegistry, StopForward
from .modifiers.base import Target
from .report import LayerReport

if TYPE_CHECKING:
    from .floats import FloatInputs

__all__ = ["OnePass", "calibrate_subsets", "execution_groups", "finish_unfired", "sample_rows"]

logger = logging.getLogger("ferroquant")


def sample_rows(x: torch.Tensor, n_samples: int, lengths: list[int] | None
                ) -> list[torch.Tensor]:
    """A module's input for ``n_samples`` samples stacked along dim 0, as one ``[tokens,
    features]`` view per sample in order. ``lengths``: the real tokens of each sample when the
    samples were right-padded to one length (pad positions never reach a statistic)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if lengths is not None:
        # [n, longest, f], or flattened to [n * longest, f] (OPT's MLP)
        per = rows.shape[0] // n_samples
        if per * n_samples != rows.shape[0] or per < max(lengths):
            raise RuntimeError(f"an input of {rows.shape[0]} tokens cannot be split into "
                               f"{n_samples} padded samples of up to {max(lengths)} tokens")
        by_sample = rows.view(n_samples, per, rows.shape[-1])
        return [by_sample[s, :n] for s, n in enumerate(lengths)]
    if n_samples > 1 and rows.shape[0] % n_samples == 0:
        return list(rows.split(rows.shape[0] // n_samples))
    return [rows]


def _shareable(a: Target, b: Target) -> bool:
    return a.modifier is b.modifier and a.modifier.can_share(a, b)


def _add(t: Target, state: Any, rows: list[torch.Tensor], label: str,
         floats: FloatInputs | None, first: int, call: int, count: int) -> None:
    """Streams ``rows`` (samples ``first ..``, the module's ``call``-th input in their
    forward) into ``state``, with their float rows when the modifier asks for them."""
    t.modifier.add_inputs(t, state, rows, label)
    if floats is not None and t.modifier.needs_float_inputs:
        t.modifier.add_float_pairs(t, state, floats.take(t, first, call, rows, count, label),
                                   rows, label)


class OnePass:
    """Forward pre-hooks for the batched pass over one block.

    With ``solve_now`` each module is quantized before it runs; ``subset`` numbers then count
    groups of consecutive modules fed one tensor, in execution order (the per-sample path's
    subsets). Without, the targets only gather statistics and the pass stops once all have
    fired; everything is subset 0. A module that runs twice in one forward cannot be solved at
    its first call: the pass records why (``unbatchable``) and does nothing more; the caller
    rolls the block back and takes the fallback path."""

    def __init__(self, targets: list[Target], label: str, solve_now: bool,
                 n_samples: int, lengths: list[int] | None = None,
                 floats: FloatInputs | None = None) -> None:
        self.n_samples = n_samples
        self.lengths = lengths
        self.floats = floats
        self.by_id = {id(t.live): t for t in targets}
        self.label = label
        self.solve_now = solve_now
        self.fired: list[tuple[Target, int]] = []
        self.fired_ids: set[int] = set()
        self.subset = -1
        self.last: tuple[torch.Tensor, Target, Any] | None = None
        self.reports: list[LayerReport] = []
        self.unbatchable = ""

    def install(self, hooks: HookRegistry) -> None:
        for t in self.by_id.values():
            t.state = None
            hooks.pre("one-pass", t.live, self._pre, prepend=True)

    def _pre(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self.unbatchable:
            return
        t = self.by_id[id(module)]
        if id(module) in self.fired_ids:
            # its statistics would need this second input too, after it was already solved
            self.unbatchable = f"layer {t.name!r} runs more than once in one block forward"
            return
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer {t.name!r} was called without a tensor input")
        if self.last is not None and self.last[0] is x and _shareable(self.last[1], t):
            state = self.last[2]
        else:
            self.subset += 1
            state = t.modifier.new_state(t, x)
            _add(t, state, sample_rows(x, self.n_samples, self.lengths), self.label,
                 self.floats, 0, 0, self.n_samples)
            self.last = (x, t, state)
        t.state = state
        self.fired_ids.add(id(module))
        self.fired.append((t, self.subset))
        if self.solve_now:
            self.reports.append(t.modifier.on_module_ready(t, self.subset))
        elif len(self.fired_ids) == len(self.by_id):
            raise StopForward

    def finish(self) -> list[LayerReport]:
        """Quantizes what is left: every fired target (without ``solve_now``), then the
        targets no token reached, each in a subset of its own."""
        self.last = None
        if not self.solve_now:  # one subset: the whole block (as on the per-sample path)
            self.reports += [t.modifier.on_module_ready(t, 0) for t, _ in self.fired]
        unfired = [t for t in self.by_id.values() if id(t.live) not in self.fired_ids]
        self.reports += finish_unfired(unfired, self.subset if self.solve_now else None)
        return self.reports


def finish_unfired(targets: list[Target], last_subset: int | None) -> list[LayerReport]:
    """Quantizes targets that saw no input (their modifier's policy for that case); each gets
    a subset of its own after ``last_subset`` (or subset 0 when subsets are not counted)."""
    out = []
    k = last_subset if last_subset is not None else 0
    for t in targets:
        if last_subset is not None:
            k += 1
        out.append(t.modifier.on_module_ready(t, k))
    return out


class _SubsetPass:
    """Forward hooks streaming a subset's inputs into its modifiers' statistics.

    Modules fed the very same tensor (q/k/v, gate/up: one ``group``) have the same statistics,
    so with ``share`` they are gathered once for the group. Should the grouping not hold on
    some sample (a member called twice, skipped, or given another tensor) the pass records
    ``diverged``, ends that forward, and the caller redoes the pass unshared. The forward also
    stops as soon as every module of the subset has seen its input for the sample."""

    def __init__(self, groups: list[list[Target]], label: str, share: bool) -> None:
        self.parts = 1  # samples stacked in the current call (chunked runs)
        self.first = 0  # the first of them
        self.lengths: list[int] | None = None  # their real lengths, when right-padded
        self.floats: FloatInputs | None = None  # the block's float inputs, when recorded
        self.groups = groups
        self.targets = [t for g in groups for t in g]
        self.label = label
        self.share = share
        self.group_of = {id(t.live): gi for gi, g in enumerate(groups) for t in g}
        self.shared_state: dict[int, Any] = {}
        self.fired: set[int] = set()
        self.counts: dict[int, int] = {}
        self.group_x: dict[int, torch.Tensor] = {}
        self.diverged = False

    def install(self, hooks: HookRegistry) -> None:
        for t in self.targets:
            t.state = None
            hooks.post("subset", t.live, self._hook(t))

    def start_sample(self) -> None:
        self.fired.clear()
        self.counts.clear()
        self.group_x.clear()

    def end_sample(self) -> None:
        if self.share:
            for g in self.groups:
                if len(g) > 1 and len({self.counts.get(id(t.live), 0) for t in g}) > 1:
                    self.diverged = True
        self.group_x.clear()

    def _diverge(self) -> None:
        self.diverged = True
        raise StopForward

    def _hook(self, t: Target) -> Callable[..., None]:
        key = id(t.live)
        gi = self.group_of[key]
        group = self.groups[gi]
        shared = self.share and len(group) > 1 and all(_shareable(group[0], u) for u in group)

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"layer {t.name!r} was called without a tensor input")
            x = x.detach()
            self.counts[key] = self.counts.get(key, 0) + 1
            call = self.counts[key] - 1  # its calls so far in this sample's forward
            if shared:
                if call > 0:
                    self._diverge()
                gx = self.group_x.get(gi)
                if gx is None:
                    if gi not in self.shared_state:
                        self.shared_state[gi] = t.modifier.new_state(t, x)
                    self.group_x[gi] = x
                    _add(t, self.shared_state[gi], sample_rows(x, self.parts, self.lengths),
                         self.label, self.floats, self.first, call, self.parts)
                elif gx is not x:
                    self._diverge()
                t.state = self.shared_state[gi]
            else:
                if t.state is None:
                    t.state = t.modifier.new_state(t, x)
                _add(t, t.state, sample_rows(x, self.parts, self.lengths), self.label,
                     self.floats, self.first, call, self.parts)
            self.fired.add(key)
            if len(self.fired) == len(self.targets):
                raise StopForward

        return hook


def calibrate_subsets(groups: list[list[Target]], label: str, run: Callable[[int], None],
                      n_calls: int, hooks: HookRegistry, sizes: list[int] | None = None,
                      lengths: list[list[int] | None] | None = None,
                      floats: FloatInputs | None = None) -> None:
    """Runs ``run(call)`` for every call under the subset's hooks (sharing statistics within
    groups, redone without sharing if a group does not hold). ``sizes``: how many samples
    each call stacks, when they are chunks of samples; ``lengths``: per call, the samples'
    real lengths when they are right-padded; ``floats``: the block's float inputs."""
    for share in (True, False):
        sp = _SubsetPass(groups, label, share)
        sp.floats = floats
        sp.install(hooks)
        try:
            first = 0
            for s in range(n_calls):
                sp.start_sample()
                sp.parts = sizes[s] if sizes else 1
                sp.first = first
                first += sp.parts
                sp.lengths = lengths[s] if lengths else None
                try:
                    run(s)
                except StopForward:
                    pass
                sp.end_sample()
                if sp.diverged:
                    break
        finally:
            hooks.remove("subset")
        if not sp.diverged:
            return
        logger.debug("%s: modules fed one tensor on the probe diverged; redoing unshared", label)


def execution_groups(block: nn.Module, targets: list[Target], hidden: torch.Tensor,
                     call: Call, hooks: HookRegistry) -> list[list[Target]]:
    """Targets grouped in execution order (probe: the first sample); consecutive modules fed
    the very same tensor form one group (q/k/v; gate/up). Modules the probe did not reach come
    last, one group each."""
    by_id = {id(t.live): t for t in targets}
    order: list[list[Target]] = []
    seen: set[int] = set()
    last_input: list[Any] = [None]

    def pre(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        x = inputs[0] if inputs else None
        if order and x is not None and x is last_input[0]:
            order[-1].append(by_id[id(module)])
        else:
            order.append([by_id[id(module)]])
        last_input[0] = x
        if len(seen) == len(by_id):
            raise StopForward

    for t in targets:
        hooks.pre("probe", t.live, pre, prepend=True)
    try:
        call_block(block, hidden, call)
    except StopForward:
        pass
    finally:
        hooks.remove("probe")
    order += [[t] for t in targets if id(t.live) not in seen]
    return order
