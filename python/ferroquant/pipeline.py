"""Block-sequential GPTQ over a Hugging Face causal LM.

1. Find the decoder blocks (:mod:`ferroquant.blocks`) and the target modules in them.
2. Capture every block's call arguments with one cheap pass per calibration sample: each block's
   ``forward`` is temporarily replaced by a recorder that stores ``(args, kwargs)`` and passes the
   hidden states through; the last block's recorder raises a private exception so nothing after
   it (final norm, ``lm_head``) runs. Block 0's hidden states are the embeddings; per-block
   keyword arguments are kept because models such as Gemma-3 or Qwen with sliding windows give
   each block its own attention mask / rotary tables. KV caches are disabled (``use_cache=False``,
   cache objects replaced by ``None``).
3. Per block, on ``device``, one of two equivalent paths:

   * batched, one pass (the default when the samples' calls can be stacked and the activations
     fit in memory): every sample's call is concatenated along the batch dimension and the block
     runs ONCE. A forward pre-hook on each target module streams the module's input into a Rust
     ``HessianAccumulator`` (modules fed the very same tensor - q/k/v, gate/up - share one), then,
     with ``true_sequential``, solves the module right there, writes the dequantized weight back,
     and only then lets the module run: its output is computed with quantized weights, so every
     layer's Hessian sees all upstream layers quantized (exactly true-sequential), and the
     block's output from this same pass is already the next block's input. Without
     ``true_sequential`` the hooks only accumulate (the pass stops after the last target), all
     modules are solved, and one more batched pass gives the outputs.
   * per subset (fallback: samples of different lengths, calls that cannot be stacked, too
     little memory, a module called twice in a block, not a transformers model): find the
     module subsets in execution order (modules fed one tensor form one subset), and per subset
     run the block sample by sample - or over chunks of stacked samples when only the memory
     is short - with forward hooks streaming inputs into the accumulators (each pass stops as
     soon as the subset has seen its inputs), solve each module; then run the block once more
     for its outputs.

   Either way each module is solved with ``solver.gptq_quantize``, its dequantized weight written
   back and ``module.fq_quant`` attached; the outputs *after* quantization feed the next block.
   The block returns to its original device. With the recipe's ``forward_dtype`` (e.g. bf16 on
   a float32 model) the forwards run on a copy of the block with its parameters in that dtype
   and the activations are kept in it; hooks sit on the copy's modules (``_Target.live``), the
   solve reads and writes the model's own weights and mirrors them into the copy.
4. Targets outside the blocks (only ``lm_head`` named explicitly, in practice) are calibrated
   last with full-model forwards.

The per-layer :class:`LayerReport` list is stored as ``model.fq_report`` and the recipe as
``model.fq_recipe``.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import cuda as fqcuda
from . import solver
from .blocks import Blocks, find_blocks, is_quantizable, linear_weight
from .calibration import CalibrationSet
from .config import GPTQ, QuantizationArgs
from .quantized import ATTR, QuantizedWeight
from .report import LayerReport, QuantizationReport

__all__ = [
    "LayerReport",
    "NonFiniteActivationError",
    "QuantizationReport",
    "UnreachedLayerError",
    "run_gptq",
]

logger = logging.getLogger("ferroquant")


class NonFiniteActivationError(FloatingPointError):
    """NaN/Inf in the activations feeding a layer (or leaving a block)."""


class UnreachedLayerError(RuntimeError):
    """A target layer received no calibration token and ``unreached_policy="error"``."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _to(obj: Any, device: torch.device, memo: dict[int, Any],
        dtype: torch.dtype | None = None) -> Any:
    """Moves tensors inside tuples/lists/dicts to ``device`` (floating ones also to ``dtype``
    when given), keeping shared tensors shared."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            cast = dtype if dtype is not None and obj.is_floating_point() else None
            memo[key] = obj.to(device, cast)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(_to(x, device, memo, dtype) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device, memo, dtype) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo, dtype) for k, v in obj.items()}
    return obj


def _cache_types() -> tuple[type, ...]:
    try:
        from transformers.cache_utils import Cache

        return (Cache,)
    except ImportError:
        return ()


_CACHE_TYPES = _cache_types()


def _no_cache(obj: Any) -> Any:
    return None if _CACHE_TYPES and isinstance(obj, _CACHE_TYPES) else obj


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def _check_finite(x: torch.Tensor, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteActivationError(
            f"{what} contain non-finite values ({n_nan} NaN, {n_inf} Inf of {x.numel()}); the "
            "model overflows in its dtype on this data - try float32/bfloat16 (the model's dtype "
            "or the recipe's forward_dtype) or check the weights and calibration text"
        )


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """``"auto"``: the GPU the model already sits on, else the CPU."""
    if device == "auto":
        return _first_device(model)
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} was asked for but CUDA is not available")
    return dev


@dataclass
class _Phases:
    """Wall time by phase (cheap counters; ``forward`` is the block loops minus the rest)."""

    capture: float = 0.0
    blocks: float = 0.0
    hessian: float = 0.0
    solve: float = 0.0
    outside: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"capture": self.capture,
                "forward": max(0.0, self.blocks - self.hessian - self.solve),
                "hessian": self.hessian, "solve": self.solve, "outside blocks": self.outside}


def _new_accumulator(x: torch.Tensor, t: _Target
                     ) -> solver.HessianAccumulator | fqcuda.HessianAccumulator:
    """A Hessian accumulator for ``t``'s activations ``x``: on x's GPU when the CUDA core loads
    (no host copy of activations) unless the recipe offloads Hessians, else the CPU core (which
    copies the activations to the host)."""
    if x.is_cuda and not t.offload_hessian and fqcuda.available():
        return fqcuda.HessianAccumulator(x.shape[-1], device=x.device)
    return solver.HessianAccumulator(x.shape[-1])


def _accumulate(name: str, acc: solver.HessianAccumulator, x: torch.Tensor, label: str,
                phases: _Phases | None) -> None:
    t0 = time.perf_counter()
    try:
        # the core scans for NaN/Inf itself; torch re-checks only to name the culprit
        acc.add_batch(x)
    except ValueError as e:
        _check_finite(x, f"the input activations of layer {name!r} ({label})")
        raise ValueError(f"layer {name!r}: {e}") from e
    finally:
        if phases is not None:
            phases.hessian += time.perf_counter() - t0


def _accumulate_samples(name: str, acc: solver.HessianAccumulator, x: torch.Tensor, label: str,
                        phases: _Phases | None, n_samples: int) -> None:
    """Adds ``x`` holding ``n_samples`` stacked samples one sample at a time, in order: the
    accumulator rescales its running sum per batch, so this gives bit for bit the Hessian of
    the per-sample path (at the same cost as one big batch)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if n_samples > 1 and rows.shape[0] % n_samples == 0:
        for part in rows.split(rows.shape[0] // n_samples):
            _accumulate(name, acc, part, label, phases)
    else:
        _accumulate(name, acc, rows, label, phases)


# --------------------------------------------------------------------------------------------
# input capture
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One recorded block call: hidden states go in ``args[0]`` or ``kwargs[hidden_key]``."""

    args: tuple[Any, ...]  # positional arguments after the hidden states
    kwargs: dict[str, Any]
    hidden_key: str | None  # None: hidden states are the first positional argument


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[torch.Tensor, _Call]:
    if args:
        hidden, rest, key = args[0], tuple(_no_cache(a) for a in args[1:]), None
        kw = dict(kwargs)
    elif "hidden_states" in kwargs:
        kw = dict(kwargs)
        hidden, rest, key = kw.pop("hidden_states"), (), "hidden_states"
    else:
        raise RuntimeError(
            "a decoder block was called without positional arguments or a 'hidden_states' "
            f"keyword (keywords: {sorted(kwargs)}); cannot tell which input is the hidden state"
        )
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"a decoder block's first input is a {type(hidden).__name__}, "
                        "expected the hidden-state tensor")
    for k in list(kw):
        kw[k] = _no_cache(kw[k])
    if "use_cache" in kw:
        kw["use_cache"] = False
    return hidden, _Call(rest, kw, key)


def _call_block(block: nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    if call.hidden_key is None:
        out = block(hidden, *call.args, **call.kwargs)
    else:
        out = block(*call.args, **{**call.kwargs, call.hidden_key: hidden})
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


def _model_inputs(model: nn.Module, sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dev = _first_device(emb) if emb is not None else _first_device(model)
    return {k: v.to(dev) for k, v in sample.items()}


def _forward_model(model: nn.Module, inputs: dict[str, Any]) -> Any:
    try:
        return model(**inputs, use_cache=False)
    except TypeError as e:
        if "use_cache" not in str(e):
            raise
        return model(**inputs)


def capture_block_inputs(model: nn.Module, blocks: Blocks, calib: CalibrationSet,
                         ) -> tuple[list[torch.Tensor], list[list[_Call]]]:
    """Block-0 hidden states per sample and every block's call (args/kwargs) per sample."""
    n_blocks = len(blocks)
    hiddens: list[torch.Tensor] = []
    calls: list[list[_Call]] = [[] for _ in range(n_blocks)]
    saved = [(b.__dict__.get("forward"), "forward" in b.__dict__) for b in blocks.modules]
    tuple_len: list[int | None] = [None]  # block output structure, learned from block 0

    def recorder(i: int, block: nn.Module, real_forward: Callable[..., Any]) -> Callable[..., Any]:
        def fwd(*args: Any, **kwargs: Any) -> Any:
            hidden, call = _split_call(args, kwargs)
            calls[i].append(call)
            if i == 0:
                hiddens.append(hidden)
                if tuple_len[0] is None:
                    # learn the output structure of a block once (a tensor or a tuple)
                    if call.hidden_key is None:
                        out = real_forward(hidden, *call.args, **call.kwargs)
                    else:
                        out = real_forward(*call.args, **{**call.kwargs, call.hidden_key: hidden})
                    tuple_len[0] = len(out) if isinstance(out, (tuple, list)) else 0
            if i == n_blocks - 1:
                raise _StopForward
            n = tuple_len[0] or 0
            return (hidden,) + (None,) * (n - 1) if n else hidden
        return fwd

    try:
        for i, b in enumerate(blocks.modules):
            b.forward = recorder(i, b, b.forward)
        for s, sample in enumerate(calib):
            try:
                _forward_model(model, _model_inputs(model, sample))
            except _StopForward:
                pass
            for i in range(n_blocks):
                if len(calls[i]) != s + 1:
                    raise RuntimeError(
                        f"block {blocks.names[i]!r} was called {len(calls[i]) - s} times for "
                        f"calibration sample {s} (expected once); the model does not run its "
                        "blocks once each in order - pass sequential_targets explicitly"
                    )
    finally:
        for b, (fwd, had) in zip(blocks.modules, saved):
            if had:
                b.forward = fwd
            else:
                b.__dict__.pop("forward", None)
    for s, h in enumerate(hiddens):
        _check_finite(h, f"the embeddings (input of block {blocks.names[0]!r}) for sample {s}")
    return hiddens, calls


# --------------------------------------------------------------------------------------------
# per-module quantization
# --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    module: nn.Module
    args: QuantizationArgs
    offload_hessian: bool = False  # keep its Hessian in host memory even when x is on a GPU
    acc: solver.HessianAccumulator | fqcuda.HessianAccumulator | None = None
    # the module the block forward calls: ``module`` itself, or its copy in ``forward_dtype``
    # while the block runs as such a copy (hooks go on ``live``; weights are read from and
    # written to ``module``, then mirrored into ``live``)
    live: nn.Module = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = self.module


def _write_weight(t: _Target, w: torch.Tensor) -> None:
    """Writes ``w`` (in the module's own weight layout) into the model's module and, while the
    block runs as a ``forward_dtype`` copy, into the copy's module too, each in its own dtype."""
    for m in (t.module,) if t.live is t.module else (t.module, t.live):
        target = m.weight.data
        target.copy_(w.to(device=target.device, dtype=target.dtype))


def _targets_in(root: nn.Module, prefix: str, recipe: GPTQ, groups: dict[str, Any],
                in_block: bool, skip: Callable[[str], bool] = lambda _: False) -> list[_Target]:
    out = []
    for name, mod in root.named_modules(prefix=prefix):
        if skip(name) or not is_quantizable(mod):
            continue
        args = recipe.args_for(name, mod, in_block=in_block, groups=groups)
        if args is not None:
            out.append(_Target(name, mod, args, recipe.offload_hessians))
    return out


def _solve(t: _Target, recipe: GPTQ, block: int, subset: int, report_rtn_loss: bool,
           phases: _Phases | None = None) -> LayerReport:
    t_all = time.perf_counter()
    try:
        return _solve_inner(t, recipe, block, subset, report_rtn_loss)
    finally:
        if phases is not None:
            phases.solve += time.perf_counter() - t_all


def _solve_inner(t: _Target, recipe: GPTQ, block: int, subset: int, report_rtn_loss: bool
                 ) -> LayerReport:
    w, transposed = linear_weight(t.module)
    a = t.args
    gs = a.effective_group_size
    samples = t.acc.samples if t.acc is not None else 0
    t0 = time.perf_counter()
    note = ""
    rtn_loss = None
    if samples == 0:
        if recipe.unreached_policy == "error":
            raise UnreachedLayerError(
                f"layer {t.name!r}: no calibration token reached it (e.g. an expert the router "
                "never chose); add calibration data or use unreached_policy='rtn'"
            )
        note = "no calibration token reached it: round-to-nearest"
        warnings.warn(f"layer {t.name!r}: {note}", UserWarning, stacklevel=5)
        res = solver.rtn_quantize(w, bits=a.num_bits, symmetric=a.symmetric, group_size=gs,
                                  observer=a.observer, name=t.name)
        method = "rtn"
    else:
        h = t.acc.hessian()
        # the GPU solver takes the Hessian where it was accumulated; its MSE grid search is not
        # ported yet, so that observer solves on the CPU
        on_gpu = isinstance(t.acc, fqcuda.HessianAccumulator) and a.observer != "mse"
        backend = fqcuda if on_gpu else solver
        res = backend.gptq_quantize(
            w, h, bits=a.num_bits, symmetric=a.symmetric, group_size=gs,
            act_order=a.actorder is not None, static_groups=a.actorder == "static",
            block_size=recipe.block_size, damp_percent=recipe.dampening_frac,
            observer=a.observer, name=t.name,
        )
        method = "gptq"
        if report_rtn_loss:
            rtn_loss = solver.rtn_quantize(w, bits=a.num_bits, symmetric=a.symmetric,
                                           group_size=gs, observer=a.observer, hessian=h,
                                           name=t.name).loss
        del h
    seconds = time.perf_counter() - t0
    qw = QuantizedWeight(codes=res.codes.cpu(), scales=res.scales.cpu(), zeros=res.zeros.cpu(),
                         g_idx=res.g_idx.cpu(), args=a)
    deq = qw.dequantize(torch.float32)
    # The weight written back must be exactly what the checkpoint writers will store.
    diff = (deq - res.dequantized.cpu().float()).abs().max().item() if deq.numel() else 0.0
    tol = 1e-5 * max(1.0, float(qw.scales.abs().max())) if qw.scales.numel() else 1e-5
    if not diff <= tol:
        raise RuntimeError(f"layer {t.name!r}: the solver's dequantized weight differs from "
                           f"scale*(code-zero) by {diff:.3g}; codes/scales/zeros are inconsistent")
    _write_weight(t, deq.t() if transposed else deq)
    setattr(t.module, ATTR, qw)
    t.acc = None  # free the Hessian
    return LayerReport(
        name=t.name, block=block, subset=subset, out_features=qw.out_features,
        in_features=qw.in_features, bits=a.num_bits, group_size=gs, symmetric=a.symmetric,
        actorder=a.actorder, method=method, loss=float(res.loss),
        damp_frac=float(res.damp_frac) if method == "gptq" else float("nan"),
        damp_attempts=list(res.damp_attempts) if method == "gptq" else [],
        dead_columns=len(res.dead_columns), samples=samples, seconds=seconds,
        rtn_loss=rtn_loss, note=note,
    )


class _ShareDivergence(Exception):
    """Modules grouped as sharing one input tensor received different ones after all."""


class _SubsetPass:
    """Forward hooks streaming a subset's inputs into Hessian accumulators.

    Modules fed the very same tensor (q/k/v, gate/up: one ``group``) have the same Hessian, so
    with ``share`` it is accumulated once for the group. Should the grouping not hold on some
    sample (a member called twice, skipped, or given another tensor) ``_ShareDivergence`` is
    raised and the caller redoes the pass unshared. The forward stops as soon as every module
    of the subset has seen its input for the sample."""

    def __init__(self, groups: list[list[_Target]], label: str, share: bool,
                 phases: _Phases | None = None) -> None:
        self.phases = phases
        self.parts = 1  # samples stacked in the current call (chunked runs)
        self.groups = groups
        self.targets = [t for g in groups for t in g]
        self.label = label
        self.share = share
        self.group_of = {id(t.live): gi for gi, g in enumerate(groups) for t in g}
        self.shared_acc: dict[int, solver.HessianAccumulator] = {}
        self.fired: set[int] = set()
        self.counts: dict[int, int] = {}
        self.group_x: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []

    def install(self) -> None:
        for t in self.targets:
            t.acc = None
            self.handles.append(t.live.register_forward_hook(self._hook(t)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.group_x.clear()

    def start_sample(self) -> None:
        self.fired.clear()
        self.counts.clear()
        self.group_x.clear()

    def end_sample(self) -> None:
        if not self.share:
            return
        for g in self.groups:
            if len(g) > 1 and len({self.counts.get(id(t.live), 0) for t in g}) > 1:
                raise _ShareDivergence

    def _add(self, t: _Target, acc: solver.HessianAccumulator, x: torch.Tensor) -> None:
        _accumulate_samples(t.name, acc, x, self.label, self.phases, self.parts)

    def _hook(self, t: _Target) -> Callable[..., None]:
        key = id(t.live)
        gi = self.group_of[key]
        shared = self.share and len(self.groups[gi]) > 1

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"layer {t.name!r} was called without a tensor input")
            x = x.detach()
            if shared:
                self.counts[key] = self.counts.get(key, 0) + 1
                if self.counts[key] > 1:
                    raise _ShareDivergence
                gx = self.group_x.get(gi)
                if gx is None:
                    if gi not in self.shared_acc:
                        self.shared_acc[gi] = _new_accumulator(x, t)
                    self.group_x[gi] = x
                    self._add(t, self.shared_acc[gi], x)
                elif gx is not x:
                    raise _ShareDivergence
                t.acc = self.shared_acc[gi]
            else:
                if t.acc is None:
                    t.acc = _new_accumulator(x, t)
                self._add(t, t.acc, x)
            self.fired.add(key)
            if len(self.fired) == len(self.targets):
                raise _StopForward

        return hook


def _calibrate(groups: list[list[_Target]], label: str, run: Callable[[int], None],
               n_samples: int, phases: _Phases | None = None,
               sizes: list[int] | None = None) -> None:
    """Runs ``run(sample)`` for every sample under the subset's hooks (sharing Hessians within
    groups, redone without sharing if a group does not hold). ``sizes``: how many samples
    each call stacks, when they are chunks of samples."""
    for share in (True, False):
        sp = _SubsetPass(groups, label, share)
        sp.phases = phases
        sp.install()
        try:
            for s in range(n_samples):
                sp.start_sample()
                sp.parts = sizes[s] if sizes else 1
                try:
                    run(s)
                except _StopForward:
                    pass
                sp.end_sample()
            return
        except _ShareDivergence:
            logger.debug("%s: modules fed one tensor on the probe diverged; redoing unshared",
                         label)
            continue
        finally:
            sp.remove()


def _execution_groups(block: nn.Module, targets: list[_Target], hidden: torch.Tensor,
                      call: _Call) -> list[list[_Target]]:
    """Targets grouped in execution order (probe: the first sample); consecutive modules fed the
    very same tensor form one group (q/k/v; gate/up). Modules the probe did not reach come
    last, one group each."""
    by_id = {id(t.live): t for t in targets}
    order: list[list[_Target]] = []
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
            raise _StopForward

    handles = [t.live.register_forward_pre_hook(pre) for t in targets]
    try:
        _call_block(block, hidden, call)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    order += [[t] for t in targets if id(t.live) not in seen]
    return order


# --------------------------------------------------------------------------------------------
# per-sample path (fallback)
# --------------------------------------------------------------------------------------------


def _quantize_block(i: int, bname: str, block: nn.Module, targets: list[_Target],
                    hiddens: list[torch.Tensor], bcalls: list[_Call], recipe: GPTQ,
                    report_rtn_loss: bool, bar: Any, phases: _Phases | None = None,
                    sizes: list[int] | None = None) -> list[LayerReport]:
    """Calibrates and solves the targets of one block, subset by subset, sample by sample (or
    chunk by chunk: ``sizes`` samples stacked in each entry of ``hiddens``)."""
    groups = _execution_groups(block, targets, hiddens[0], bcalls[0])
    subsets = [[g] for g in groups] if recipe.true_sequential else [groups]
    out: list[LayerReport] = []

    def run(s: int) -> None:
        _call_block(block, hiddens[s], bcalls[s])

    for k, subset in enumerate(subsets):
        bar.set_postfix_str(f"{bname} subset {k + 1}/{len(subsets)}")
        _calibrate(subset, f"block {bname}", run, len(hiddens), phases, sizes)
        out += [_solve(t, recipe, i, k, report_rtn_loss, phases) for g in subset for t in g]
    return out


def _propagate(bname: str, block: nn.Module, hiddens: list[torch.Tensor],
               bcalls: list[_Call]) -> list[torch.Tensor]:
    """The block's outputs (after its quantization): the next block's inputs (one per entry of
    ``hiddens``: a sample, or a chunk of stacked samples)."""
    new = []
    first = 0
    for h, c in zip(hiddens, bcalls):
        out = _call_block(block, h, c)
        _check_batch_finite(out, bname, first)
        first += int(h.shape[0])
        new.append(out)
    return new


# --------------------------------------------------------------------------------------------
# batched, one-pass path
# --------------------------------------------------------------------------------------------


class _Unbatchable(Exception):
    """The block cannot run the batched path (the message says why); the per-sample path does."""


def _merge(values: list[Any], where: str) -> Any:
    """One call argument for the stacked batch, from its per-sample values: a tensor equal in
    every sample (causal mask, rotary tables of the same positions) is kept once and
    broadcasts; per-sample tensors ``[1, ...]`` are concatenated along dim 0; containers are
    merged item by item; anything else must be equal in every sample."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise _Unbatchable(f"{where} is a tensor for some samples only")
        like = all(v.shape == first.shape and v.dtype == first.dtype and v.device == first.device
                   for v in values)
        if all(v is first for v in values) or (like and all(torch.equal(v, first)
                                                            for v in values[1:])):
            return first
        if not like or first.dim() == 0 or first.shape[0] != 1:
            shapes = sorted({tuple(v.shape) for v in values})[:3]
            raise _Unbatchable(f"{where} differs between samples and has no batch dimension "
                               f"of 1 to stack on (shapes {shapes})")
        return torch.cat(values, 0)
    if isinstance(first, (tuple, list)) and type(first) in (tuple, list):
        if not all(type(v) is type(first) and len(v) == len(first) for v in values):
            raise _Unbatchable(f"{where} has a different structure between samples")
        return type(first)(_merge([v[j] for v in values], f"{where}[{j}]")
                           for j in range(len(first)))
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
            raise _Unbatchable(f"{where} has different keys between samples")
        return {k: _merge([v[k] for v in values], f"{where}[{k!r}]") for k in first}
    for v in values[1:]:
        if v is first:
            continue
        if isinstance(v, torch.Tensor):
            raise _Unbatchable(f"{where} is a tensor for some samples only")
        try:
            same = bool(v == first)
        except Exception:  # noqa: BLE001 - objects without a usable ==: not batchable
            same = False
        if not same:
            raise _Unbatchable(f"{where} differs between samples ({first!r} vs {v!r})"[:200])
    return first


def _batch_calls(hiddens: list[torch.Tensor], calls: list[_Call],
                 stacked: torch.Tensor | None = None) -> tuple[torch.Tensor, _Call]:
    """All samples' calls as one call with the hidden states stacked along dim 0
    (``stacked``: that stack, when the previous block already produced it)."""
    shapes = {tuple(h.shape) for h in hiddens}
    if len(shapes) != 1:
        raise _Unbatchable(f"samples have different hidden-state shapes ({len(shapes)} kinds, "
                           f"e.g. {sorted(shapes)[:3]})")
    shape = next(iter(shapes))
    if len(shape) < 2 or shape[0] != 1:
        raise _Unbatchable(f"hidden states of shape {list(shape)} (expected [1, seq, hidden])")
    if len({c.hidden_key for c in calls}) != 1 or len({len(c.args) for c in calls}) != 1 \
            or len({tuple(sorted(c.kwargs)) for c in calls}) != 1:
        raise _Unbatchable("samples call the block with different arguments")
    c0 = calls[0]
    args = tuple(_merge([c.args[j] for c in calls], f"positional argument {j + 1}")
                 for j in range(len(c0.args)))
    kwargs = {k: _merge([c.kwargs[k] for c in calls], f"keyword argument {k!r}")
              for k in c0.kwargs}
    if stacked is None:
        stacked = torch.cat(hiddens, 0) if len(hiddens) > 1 else hiddens[0]
    return stacked, _Call(args, kwargs, c0.hidden_key)


def _chunk_calls(hiddens: list[torch.Tensor], calls: list[_Call], k: int
                 ) -> tuple[list[torch.Tensor], list[_Call], list[int]]:
    """The samples stacked ``k`` at a time (the last chunk may be smaller)."""
    hs, cs, sizes = [], [], []
    for j in range(0, len(hiddens), k):
        h, c = _batch_calls(hiddens[j:j + k], calls[j:j + k])
        hs.append(h)
        cs.append(c)
        sizes.append(min(k, len(hiddens) - j))
    return hs, cs, sizes


def _check_batch_finite(out: torch.Tensor, bname: str, first: int = 0) -> None:
    """Block outputs of stacked samples ``first, first + 1, ...``: NaN/Inf names the sample."""
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        for s in range(out.shape[0]):
            _check_finite(out[s:s + 1], f"the outputs of block {bname!r} for sample {first + s}")
        _check_finite(out, f"the outputs of block {bname!r}")


class _OnePass:
    """Forward pre-hooks for the batched pass over one block.

    Each target's hook streams its input into a Hessian accumulator - the one of the previous
    target when both got the very same tensor (q/k/v, gate/up: computed once) - and, with
    ``solve_now``, solves the module before it runs, so downstream modules see its quantized
    output. Without ``solve_now`` the targets are only calibrated and the pass stops once all
    have fired. With ``solve_now``, ``subset`` numbers count groups of consecutive modules fed
    one tensor, in execution order (the per-sample path's subsets); without, all are subset 0."""

    def __init__(self, targets: list[_Target], label: str, block: int, recipe: GPTQ,
                 solve_now: bool, report_rtn_loss: bool, phases: _Phases | None,
                 n_samples: int) -> None:
        self.n_samples = n_samples
        self.by_id = {id(t.live): t for t in targets}
        self.label, self.block, self.recipe = label, block, recipe
        self.solve_now, self.report_rtn_loss, self.phases = solve_now, report_rtn_loss, phases
        self.fired: list[tuple[_Target, int]] = []
        self.fired_ids: set[int] = set()
        self.subset = -1
        self.last: tuple[torch.Tensor, solver.HessianAccumulator] | None = None
        self.reports: list[LayerReport] = []
        self.handles: list[Any] = []

    def install(self) -> None:
        for t in self.by_id.values():
            t.acc = None
            self.handles.append(t.live.register_forward_pre_hook(self._pre))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.last = None

    def _pre(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        t = self.by_id[id(module)]
        if id(module) in self.fired_ids:
            # its Hessian would need this second input too, after it was already solved
            raise _Unbatchable(f"layer {t.name!r} runs more than once in one block forward")
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer {t.name!r} was called without a tensor input")
        if self.last is not None and self.last[0] is x:
            acc = self.last[1]
        else:
            self.subset += 1
            acc = _new_accumulator(x, t)
            _accumulate_samples(t.name, acc, x, self.label, self.phases, self.n_samples)
            self.last = (x, acc)
        t.acc = acc
        self.fired_ids.add(id(module))
        self.fired.append((t, self.subset))
        if self.solve_now:
            self.reports.append(_solve(t, self.recipe, self.block, self.subset,
                                       self.report_rtn_loss, self.phases))
        elif len(self.fired_ids) == len(self.by_id):
            raise _StopForward

    def finish(self) -> list[LayerReport]:
        """Solves what is left: every fired target (without ``solve_now``), then the targets no
        token reached (``_solve``'s unreached policy), each in a subset of its own."""
        if not self.solve_now:  # one subset: the whole block (as on the per-sample path)
            self.reports += [_solve(t, self.recipe, self.block, 0, self.report_rtn_loss,
                                    self.phases) for t, _ in self.fired]
        k = self.subset
        for t in self.by_id.values():
            if id(t.live) not in self.fired_ids:
                k += 1
                self.reports.append(_solve(t, self.recipe, self.block,
                                           k if self.solve_now else 0,
                                           self.report_rtn_loss, self.phases))
        return self.reports


def _quantize_block_batched(i: int, bname: str, block: nn.Module, targets: list[_Target],
                            hidden: torch.Tensor, call: _Call, recipe: GPTQ,
                            report_rtn_loss: bool, phases: _Phases | None
                            ) -> tuple[list[LayerReport], torch.Tensor]:
    """Quantizes one block from one stacked call; returns the reports and the block's outputs
    after quantization. Raises ``_Unbatchable`` (weights untouched) when the block cannot."""
    saved = {id(t.module): t.module.weight.detach().clone() for t in targets}
    op = _OnePass(targets, f"block {bname}", i, recipe, recipe.true_sequential,
                  report_rtn_loss, phases, int(hidden.shape[0]))
    try:
        op.install()
        try:
            out = _call_block(block, hidden, call)
        except _StopForward:
            out = None
        finally:
            op.remove()
        reports = op.finish()
    except _Unbatchable:
        for t in targets:  # undo what was solved before the block turned out not batchable
            _write_weight(t, saved[id(t.module)])
            t.acc = None
            if ATTR in t.module.__dict__:
                delattr(t.module, ATTR)
        raise
    if out is None or (targets and not recipe.true_sequential):
        out = _call_block(block, hidden, call)  # the outputs after quantization
    _check_batch_finite(out, bname)
    return reports, out


def _forward_copy(block: nn.Module, targets: list[_Target], bname: str,
                  dtype: torch.dtype | None) -> nn.Module:
    """The module the block's calibration forwards run: ``block`` itself, or - when
    ``forward_dtype`` differs from its floating parameters - a copy with those cast to
    ``dtype``, whose target modules become the targets' ``live`` modules (undo with
    ``t.live = t.module``). Buffers keep their dtype: they are tables (rotary frequencies,
    masks) whose precision the model's own code manages."""
    floats = [p for p in block.parameters() if p.is_floating_point()]
    if dtype is None or all(p.dtype == dtype for p in floats):
        return block
    try:
        runner = copy.deepcopy(block)
    except Exception as e:  # any failure to copy: say which block and why
        raise RuntimeError(
            f"forward_dtype={str(dtype).removeprefix('torch.')!r}: block {bname!r} cannot be "
            f"copied to run in that dtype ({type(e).__name__}: {e}); leave forward_dtype unset"
        ) from e
    for p in runner.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    mods = dict(runner.named_modules(prefix=bname))
    for t in targets:
        t.live = mods[t.name]
    return runner


def _available_memory(dev: torch.device) -> int | None:
    """Bytes that can still be allocated on ``dev`` (None if unknown)."""
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _attention_heads(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for k in ("num_attention_heads", "n_head", "num_heads"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _batch_bytes(blocks: Blocks, hiddens: list[torch.Tensor], heads: int | None) -> int:
    """Rough peak activation memory of one block pass over all samples stacked: a few live
    tensors as wide as the widest layer, plus attention scores should the attention kernel
    materialize them."""
    n = len(hiddens)
    seq, d = int(hiddens[0].shape[-2]), int(hiddens[0].shape[-1])
    el = hiddens[0].element_size()
    width = d
    for b in blocks.modules:
        for m in b.modules():
            if is_quantizable(m):
                width = max(width, *linear_weight(m)[0].shape)
    h = heads or max(1, d // 64)
    return n * seq * (6 * width + 4 * d) * el + 2 * n * h * seq * seq * max(el, 4)


def _batching_plan(model: nn.Module, blocks: Blocks, hiddens: list[torch.Tensor],
                   dev: torch.device, batched: bool | None) -> tuple[int, str]:
    """(samples stacked per block call, why) for this run: all of them = the one-pass path;
    fewer = the subset-by-subset path over chunks; 1 = sample by sample."""
    n = len(hiddens)
    if batched is not None:
        return (n, "batched=True") if batched else (1, "batched=False")
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        # stacking samples assumes the block treats batch rows independently, which holds
        # for transformers' decoder layers; arbitrary modules may branch on their input
        return 1, "not a transformers model (pass batched=True to stack samples anyway)"
    if len({tuple(h.shape) for h in hiddens}) != 1:
        return 1, "samples of different lengths"
    need = _batch_bytes(blocks, hiddens, _attention_heads(model))
    avail = _available_memory(dev)
    gib = 1 << 30
    if avail is None:
        budget, have = 2 * gib, "free memory unknown, limit 2 GiB"
    else:
        budget, have = avail // 2, f"{avail / gib:.1f} GiB available, limit half"
    k = n if need <= budget else max(1, min(n - 1, int(n * budget // max(need, 1))))
    return k, f"~{need / gib:.2f} GiB of activations for all samples, {have}"


# --------------------------------------------------------------------------------------------
# main loop
# --------------------------------------------------------------------------------------------


def run_gptq(model: nn.Module, recipe: GPTQ, calib: CalibrationSet, *,
             device: str | torch.device | None = "cpu", show_progress: bool = True,
             report_rtn_loss: bool = False, batched: bool | None = None) -> QuantizationReport:
    """Quantizes ``model`` in place; see the module docstring.

    ``batched``: None (default) runs each block once over all samples stacked when the model is
    a transformers model, the samples have one length and the estimated activations fit in half
    the free memory of ``device``; when they do not fit, the subset-by-subset path runs over
    chunks of as many samples as fit; otherwise sample by sample. True always stacks all
    samples (where the captured calls allow it); False always goes sample by sample (least
    memory, ~2.5x the block passes, each several times slower than a stacked one). All paths
    give the same quantized weights up to float rounding. The path taken per block is in the
    report's ``block_paths`` and the time per phase in its ``phase_seconds``."""
    if len(calib) == 0:
        raise ValueError("the calibration set is empty")
    dev = _resolve_device(device, model)
    t_start = time.perf_counter()
    phases = _Phases()
    blocks = find_blocks(model, recipe.sequential_targets)
    groups = recipe.resolved_groups()

    per_block = [_targets_in(b, n, recipe, groups, in_block=True)
                 for n, b in zip(blocks.names, blocks.modules)]
    block_prefixes = tuple(n + "." for n in blocks.names)
    outside = _targets_in(model, "", recipe, groups, in_block=False,
                          skip=lambda n: n in blocks.names or n.startswith(block_prefixes))
    if not any(per_block) and not outside:
        found = sorted({type(m).__name__ for b in blocks.modules for m in b.modules()
                        if is_quantizable(m)})
        raise ValueError(
            f"no module matched the recipe's targets inside the decoder blocks {blocks.path!r} "
            f"(targets per group: {[g.targets for g in groups.values()]}, ignore: "
            f"{recipe.ignore}); quantizable classes there: {found}"
        )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for t in outside:
        if emb is not None and t.module.weight is getattr(emb, "weight", None):
            raise ValueError(
                f"layer {t.name!r} shares its weight with the input embeddings "
                "(tie_word_embeddings); quantizing it would also change the embeddings. Untie "
                "the weights first or drop it from the targets"
            )

    was_training = model.training
    model.eval()
    reports: list[LayerReport] = []
    paths: list[str] = []
    try:
        with torch.no_grad():
            hiddens, calls = capture_block_inputs(model, blocks, calib)
            fdt = getattr(torch, recipe.forward_dtype) if recipe.forward_dtype else None
            hiddens = [h.to(dev, fdt) for h in hiddens]
            phases.capture = time.perf_counter() - t_start
            chunk, why = _batching_plan(model, blocks, hiddens, dev, batched)
            n = len(hiddens)
            logger.info("ferroquant: %s (%s)", "one batched pass per block" if chunk >= n else
                        f"block passes per subset over chunks of {chunk} samples" if chunk > 1
                        else "block passes per subset, sample by sample", why)
            stacked: torch.Tensor | None = None  # hiddens stacked, when a batched block made it
            t_blocks = time.perf_counter()
            bar = tqdm(total=len(blocks), desc="GPTQ", unit="block", disable=not show_progress)
            try:
                for i, (bname, block) in enumerate(zip(blocks.names, blocks.modules)):
                    home = _first_device(block)
                    block.to(dev)
                    runner = block
                    try:
                        runner = _forward_copy(block, per_block[i], bname, fdt)
                        memo: dict[int, Any] = {}
                        bcalls = [_Call(_to(c.args, dev, memo, fdt),
                                        _to(c.kwargs, dev, memo, fdt), c.hidden_key)
                                  for c in calls[i]]
                        path, why_not = "", ""
                        if chunk >= n:
                            try:
                                bar.set_postfix_str(f"{bname} batched")
                                hb, cb = _batch_calls(hiddens, bcalls, stacked)
                                rep, stacked = _quantize_block_batched(
                                    i, bname, runner, per_block[i], hb, cb, recipe,
                                    report_rtn_loss, phases)
                                del hb, cb
                                reports += rep
                                hiddens = list(stacked.split(1, 0))
                                path = "batched"
                            except _Unbatchable as e:
                                why_not = str(e)
                        if not path:
                            stacked = None
                            k = chunk
                            try:
                                hs, cs, sizes = (_chunk_calls(hiddens, bcalls, k) if k > 1
                                                 else (hiddens, bcalls, [1] * n))
                            except _Unbatchable as e:
                                why_not = why_not or str(e)
                                k, hs, cs, sizes = 1, hiddens, bcalls, [1] * n
                            path = "per-sample" if k == 1 else f"chunks of {k}"
                            if why_not:
                                path += f" ({why_not})"
                                logger.info("ferroquant: block %r: %s", bname, path)
                            if per_block[i]:
                                reports += _quantize_block(i, bname, runner, per_block[i], hs,
                                                           cs, recipe, report_rtn_loss, bar,
                                                           phases, sizes)
                            bar.set_postfix_str(f"{bname} outputs")
                            outs = _propagate(bname, runner, hs, cs)
                            hiddens = [o[j:j + 1] for o in outs for j in range(o.shape[0])]
                            del hs, cs, outs
                        paths.append(path)
                        del bcalls, memo
                        calls[i] = []
                    finally:
                        for t in per_block[i]:
                            t.live = t.module
                        del runner
                        block.to(home)
                    bar.update(1)
            finally:
                bar.close()
            phases.blocks = time.perf_counter() - t_blocks
            del hiddens, stacked
            if outside:
                t_out = time.perf_counter()
                h0, s0 = phases.hessian, phases.solve
                reports += _quantize_outside(model, outside, calib, recipe, report_rtn_loss)
                phases.outside = time.perf_counter() - t_out
                phases.hessian, phases.solve = h0, s0
    finally:
        model.train(was_training)

    rep = QuantizationReport(reports, seconds=time.perf_counter() - t_start,
                             num_samples=len(calib), num_tokens=calib.num_tokens,
                             blocks=blocks.path, block_paths=paths,
                             phase_seconds=phases.as_dict())
    model.fq_recipe = recipe
    model.fq_report = rep
    logger.info("ferroquant GPTQ report\n%s", rep.table())
    return rep


def _quantize_outside(model: nn.Module, targets: list[_Target], calib: CalibrationSet,
                      recipe: GPTQ, report_rtn_loss: bool) -> list[LayerReport]:
    """Modules outside the blocks (an explicitly targeted ``lm_head``): full-model forwards, so
    their inputs carry every block's quantization error."""
    samples = list(calib)

    def run(s: int) -> None:
        _forward_model(model, _model_inputs(model, samples[s]))

    _calibrate([[t] for t in targets], "outside the decoder blocks", run, len(samples))
    return [_solve(t, recipe, -1, 0, report_rtn_loss) for t in targets]
