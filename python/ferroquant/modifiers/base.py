"""What every modifier shares: the calibration lifecycle as a small state machine, and the
per-module :class:`Target` the sequential pipeline hands back to the modifier that owns it.

Lifecycle (llm-compressor's ``QuantizationMixin``)::

    initialize          resolve the recipe into per-module schemes (targets / ignore / ``re:``);
                        nothing is quantized yet
    start_calibration   quantization enabled: a module's weights are replaced by their quantized
                        values as soon as they are solved, so later modules and blocks see them
    on_module_ready     a target has seen every calibration input it will get: quantize it
                        (its weights, and from then on its input/output activations)
    on_block_end        a decoder block's calibration is over: its activation and KV-cache
                        quantizers move from the pass's hooks onto the model's modules
    end_calibration     per-module statistics dropped, scales and zero points frozen (weights
                        in ``module.fq_quant``, activations in ``module.fq_input`` /
                        ``fq_output``, the KV cache in the attention's ``fq_kv``);
                        quantization stays enabled

The pipeline drives the calls; a call out of order raises :class:`LifecycleError`.

Inputs. A modifier with ``needs_inputs`` gets each target's input activations in the
calibration pass - the inputs of the model as it is being quantized, X~ - through ``new_state``
and ``add_inputs(t, state, rows, label)``: one ``[tokens, features]`` tensor per sample, pads
removed. One that also sets ``needs_float_inputs`` (GPTAQ, Qronos: statistics such as
X X~^T or (X - X~) X~^T) gets, right after each ``add_inputs``,
``add_float_pairs(t, state, float_rows, quant_rows, label)``: ``quant_rows`` are the rows just
given to ``add_inputs`` and ``float_rows`` the FLOAT model's inputs X of the same module for the
same samples and tokens, row for row (same shapes). The pipeline gets them from a second
stream, the float model's hidden states, run through each block with its float weights (in the
recipe's ``forward_dtype`` when set, no activation quantization) before any of the block's
targets is quantized (``QuantizationReport.phase_seconds["float forward"]``); they are held
only while that block is calibrated. Such a modifier's targets must lie inside the decoder
blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..activations import ActivationQuantizer, KVCacheQuantizer
from ..blocks import Blocks, is_quantizable, linear_weight
from ..config import QuantizationArgs, QuantizationScheme
from ..report import LayerReport

__all__ = ["KVTarget", "LifecycleError", "Modifier", "Target"]


class LifecycleError(RuntimeError):
    """A modifier was driven out of order (e.g. ``start_calibration`` before ``initialize``)."""


@dataclass(eq=False)
class Target:
    """One module a modifier quantizes, with that modifier's calibration state for it."""

    name: str
    module: nn.Module
    args: QuantizationArgs
    modifier: Modifier
    block: int  # index of its decoder block; -1 outside the blocks
    # the module the block forward calls: ``module`` itself, or its copy while the block runs
    # in the recipe's ``forward_dtype`` (hooks go on ``live``; weights are read from and
    # written to ``module``, then mirrored into ``live``)
    live: nn.Module = None  # type: ignore[assignment]
    state: Any = None  # the modifier's statistics for it (e.g. a Hessian accumulator)
    extra: dict[str, Any] = field(default_factory=dict)
    scheme: QuantizationScheme | None = None
    # its input / output activations' quantizers (enabled once the module is quantized)
    inp: ActivationQuantizer | None = None
    out: ActivationQuantizer | None = None

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = self.module
        if self.scheme is not None:
            if self.scheme.input_activations is not None:
                self.inp = ActivationQuantizer(self.scheme.input_activations)
            if self.scheme.output_activations is not None:
                self.out = ActivationQuantizer(self.scheme.output_activations)

    @property
    def static_input(self) -> bool:
        """Whether its input scale is calibrated (so its inputs must be observed)."""
        return self.inp is not None and not self.inp.args.dynamic

    def write_weight(self, w: torch.Tensor) -> None:
        """Writes ``w`` (in the module's own weight layout) into the model's module and, while
        the block runs as a ``forward_dtype`` copy, into the copy too, each in its own dtype."""
        for m in (self.module,) if self.live is self.module else (self.module, self.live):
            target = m.weight.data
            target.copy_(w.to(device=target.device, dtype=target.dtype))


@dataclass(eq=False)
class KVTarget:
    """An attention module whose cached keys and values a modifier quantizes."""

    name: str
    module: nn.Module
    quant: KVCacheQuantizer
    block: int
    live: nn.Module = None  # type: ignore[assignment]  # see Target.live

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = self.module


class Modifier:
    """Base class: the lifecycle state machine and target resolution. Subclasses implement the
    calibration events they need."""

    #: whether the pipeline must stream each target's input activations to :meth:`add_inputs`
    needs_inputs: bool = False
    #: with ``needs_inputs``: whether it also needs the float model's inputs of the same tokens
    #: (:meth:`add_float_pairs`)
    needs_float_inputs: bool = False
    #: whether modules fed the very same tensor may share one statistic (``new_state``)
    shares_inputs: bool = False
    #: quantize a block's modules in execution order, each seeing the earlier ones quantized
    sequential: bool = False

    _ORDER = ("created", "initialized", "calibrating", "finished")

    def __init__(self) -> None:
        self.state = "created"
        self.per_block: list[list[Target]] = []
        self.outside: list[Target] = []
        self.kv_per_block: list[list[KVTarget]] = []
        self.reports: list[LayerReport] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def _advance(self, expected: str, new: str) -> None:
        if self.state != expected:
            raise LifecycleError(f"{type(self).__name__}: cannot go to {new!r} from "
                                 f"{self.state!r} (expected {expected!r} first)")
        self.state = new

    def initialize(self, model: nn.Module, blocks: Blocks) -> None:
        self._advance("created", "initialized")
        self.per_block, self.outside = self.resolve_targets(model, blocks)
        self.kv_per_block = self.resolve_kv_targets(model, blocks)

    def start_calibration(self, model: nn.Module) -> None:
        self._advance("initialized", "calibrating")

    def end_calibration(self, model: nn.Module) -> None:
        self._advance("calibrating", "finished")
        for t in self.all_targets():
            t.state = None
            t.live = t.module

    def abort(self) -> None:
        """After an error: drop every statistic (hooks are the pipeline registry's)."""
        for t in self.all_targets():
            t.state = None
            t.live = t.module
        self.state = "finished"

    # ---- targets ------------------------------------------------------------------------

    def scheme_for(self, name: str, module: nn.Module, in_block: bool
                   ) -> QuantizationScheme | None:
        raise NotImplementedError

    def resolve_kv_targets(self, model: nn.Module, blocks: Blocks) -> list[list[KVTarget]]:
        """The attention modules whose KV cache this modifier quantizes, per block."""
        return [[] for _ in blocks.names]

    def describe(self) -> str:
        """What the modifier targets, for error messages."""
        return type(self).__name__

    def describe_kv(self) -> str:
        """What it made of the KV cache, for the report ("" when nothing)."""
        return ""

    def resolve_targets(self, model: nn.Module, blocks: Blocks
                        ) -> tuple[list[list[Target]], list[Target]]:
        """Targets per decoder block, and outside the blocks (matched by full name or regex
        only, never by class name: ``lm_head`` only when named)."""
        per_block = [list(self._targets_in(b, n, i, True))
                     for i, (n, b) in enumerate(zip(blocks.names, blocks.modules))]
        prefixes = tuple(n + "." for n in blocks.names)
        outside = list(self._targets_in(
            model, "", -1, False, skip=lambda n: n in blocks.names or n.startswith(prefixes)))
        return per_block, outside

    def _targets_in(self, root: nn.Module, prefix: str, block: int, in_block: bool,
                    skip: Callable[[str], bool] = lambda _: False) -> Iterator[Target]:
        for name, mod in root.named_modules(prefix=prefix):
            if skip(name) or not is_quantizable(mod):
                continue
            s = self.scheme_for(name, mod, in_block)
            if s is not None:
                yield Target(name, mod, s.weights, self, block, scheme=s)

    def all_targets(self) -> Iterator[Target]:
        for ts in self.per_block:
            yield from ts
        yield from self.outside

    # ---- calibration events (called by the pipeline) -------------------------------------

    def can_share(self, a: Target, b: Target) -> bool:
        """Whether ``b`` may use the statistic ``a`` gathered from the very same tensor."""
        return self.shares_inputs

    def install_block_hooks(self, block: int, add_pre: Callable[..., None],
                            add_post: Callable[..., None]) -> None:
        """Before a block's passes: hooks on the modules the passes run (``live``) that this
        modifier needs there (activation and KV-cache quantization); they are removed when
        the block is done."""

    def on_block_end(self, block: int) -> None:
        """A block's calibration is over (its pass hooks are about to be removed)."""

    def on_block_start(self, block: int, targets: list[Target]) -> list[LayerReport]:
        """Before a block's calibration pass (``targets``: this modifier's targets in it);
        returns the reports of modules quantized there (those needing no inputs)."""
        return []

    def new_state(self, t: Target, x: torch.Tensor) -> Any:
        """A fresh statistic for ``t`` whose first input is ``x``."""
        raise NotImplementedError

    def add_inputs(self, t: Target, state: Any, rows: list[torch.Tensor], label: str) -> None:
        """Adds ``t``'s input activations to ``state``: one ``[tokens, features]`` tensor per
        calibration sample, in sample order, padding removed."""
        raise NotImplementedError

    def add_float_pairs(self, t: Target, state: Any, float_rows: list[torch.Tensor],
                        quant_rows: list[torch.Tensor], label: str) -> None:
        """With ``needs_float_inputs``, right after :meth:`add_inputs` got ``quant_rows``: the
        float model's inputs of ``t`` for the same samples and tokens, tensor for tensor of
        the same shape (equal to ``quant_rows`` while no upstream layer is quantized)."""
        raise NotImplementedError

    def on_module_ready(self, t: Target, subset: int) -> LayerReport:
        """``t`` has seen all its inputs: quantize it now (its weight is replaced)."""
        raise NotImplementedError

    def rollback(self, t: Target, weight: torch.Tensor) -> None:
        """Undo ``t``'s quantization in this block (the batched pass was abandoned)."""
        t.write_weight(weight)
        t.state = None

    @staticmethod
    def weight_of(t: Target) -> tuple[torch.Tensor, bool]:
        return linear_weight(t.module)
