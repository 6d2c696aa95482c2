"""GPTQ as a modifier: each target's input activations stream into a Hessian accumulator
(modules fed the very same tensor share one), and when the target has seen them all the Rust
solver chooses its codes column by column, compensating each column's error in the columns
still to come; the dequantized weight replaces the float one."""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Any

import torch

from .. import cuda as fqcuda
from .. import solver
from ..calls import NonFiniteActivationError, check_finite
from ..config import GPTQ, QuantizationArgs
from ..report import LayerReport
from .base import Target
from .quantization import WeightModifier

__all__ = ["GPTQModifier", "UnreachedLayerError"]


class UnreachedLayerError(RuntimeError):
    """A target layer received no calibration token and ``unreached_policy="error"``."""


_warned_cuda: set[str] = set()


def _warn_cpu_fallback() -> None:
    why = fqcuda.unavailable_reason() or "unknown reason"
    if why not in _warned_cuda:
        _warned_cuda.add(why)
        warnings.warn(f"ferroquant's CUDA core did not load ({why}); Hessians and solves run on "
                      "the CPU core (host copies of every activation batch)", RuntimeWarning,
                      stacklevel=3)


class GPTQModifier(WeightModifier):
    """GPTQ on every target of ``recipe`` (block by block, true-sequential by default)."""

    needs_inputs = True

    def __init__(self, recipe: GPTQ, *, report_rtn_loss: bool = False,
                 scale_dtype: torch.dtype | None = None) -> None:
        super().__init__(recipe, scale_dtype=scale_dtype)
        self.sequential = recipe.true_sequential
        self.report_rtn_loss = report_rtn_loss
        self._label = ""
        # GPTAQ and Qronos: the float model's inputs too, and (X - X~) X~^T per statistic
        self.gptaq_alpha = recipe.gptaq_alpha or None
        self.qronos = recipe.qronos
        self.variant = "qronos" if self.qronos else "gptaq" if self.gptaq_alpha else "gptq"
        self.needs_float_inputs = self.variant != "gptq"
        self._cross: weakref.WeakKeyDictionary[Any, solver.CrossAccumulator] = (
            weakref.WeakKeyDictionary())

    # ---- statistics -----------------------------------------------------------------------

    def new_core_state(self, t: Target, x: torch.Tensor) -> Any:
        """A Hessian accumulator for ``t``'s activations ``x``: on x's GPU when the CUDA core
        loads (no host copy of activations) unless the recipe offloads Hessians, else the CPU
        core (which copies the activations to the host)."""
        if x.is_cuda and not self.recipe.offload_hessians:
            if fqcuda.available():
                return fqcuda.HessianAccumulator(x.shape[-1], device=x.device)
            _warn_cpu_fallback()
        return solver.HessianAccumulator(x.shape[-1])

    def add_core(self, t: Target, acc: Any, x: torch.Tensor, label: str) -> None:
        """Adds one sample: the accumulator rescales its running sum per batch, so samples
        added one at a time from a stacked pass give bit for bit the Hessian of the per-sample
        path (at the same cost as one big batch)."""
        name = t.name
        t0 = time.perf_counter()
        self._label = label  # where the inputs come from, for _hessian's error
        try:
            # the core scans for NaN/Inf itself; torch re-checks only to name the culprit
            acc.add_batch(x)
        except ValueError as e:
            check_finite(x, f"the input activations of layer {name!r} ({label})")
            raise ValueError(f"layer {name!r}: {e}") from e
        finally:
            self.seconds["hessian"] += time.perf_counter() - t0

    def add_float_pairs(self, t: Target, state: Any, float_rows: list[torch.Tensor],
                        quant_rows: list[torch.Tensor], label: str) -> None:
        """GPTAQ, Qronos: folds ``(X - X~) X~^T`` of each sample into the state's cross accumulator,
        sample by sample like the Hessian (same scaling)."""
        t0 = time.perf_counter()
        try:
            acc = self._cross.get(state)
            for f, q in zip(float_rows, quant_rows, strict=True):
                if acc is None:
                    acc = self._cross[state] = solver.CrossAccumulator(q.shape[-1])
                try:
                    acc.add_batch(f, q)
                except ValueError as e:
                    check_finite(f, f"the float-model inputs of layer {t.name!r} ({label})")
                    raise ValueError(f"layer {t.name!r}: {e}") from e
        finally:
            self.seconds["hessian"] += time.perf_counter() - t0

    def _hessian(self, t: Target) -> torch.Tensor:
        try:
            return t.state.core.hessian()
        except ValueError as e:
            # the GPU accumulator records a NaN/Inf batch on the device and reports it here,
            # once, instead of waiting for the GPU at every batch
            raise NonFiniteActivationError(
                f"the input activations of layer {t.name!r} ({self._label}) contain non-finite "
                f"values: {e}") from e

    # ---- the solve ------------------------------------------------------------------------

    def on_module_ready(self, t: Target, subset: int) -> LayerReport:
        t0 = time.perf_counter()
        try:
            return self._solve(t, subset)
        finally:
            self.seconds["solve"] += time.perf_counter() - t0

    def _solve(self, t: Target, subset: int) -> LayerReport:
        w, _ = self.weight_of(t)
        a: QuantizationArgs = t.args
        samples = t.state.samples if t.state is not None else 0
        if a.type == "float":  # FP8 weights: no integer grid for GPTQ to solve on
            return self.quantize_rtn(t, subset, note="FP8 weights are rounded to nearest")
        if samples == 0:
            if self.recipe.unreached_policy == "error":
                raise UnreachedLayerError(
                    f"layer {t.name!r}: no calibration token reached it (e.g. an expert the "
                    "router never chose); add calibration data or use unreached_policy='rtn'"
                )
            note = "no calibration token reached it: round-to-nearest"
            warnings.warn(f"layer {t.name!r}: {note}", UserWarning, stacklevel=2)
            return self.quantize_rtn(t, subset, note=note)
        t0 = time.perf_counter()
        h = self._hessian(t)
        # the GPU solver takes the Hessian where it was accumulated; its MSE grid searches are
        # not ported yet, so those observers solve on the CPU
        on_gpu = (isinstance(t.state.core, fqcuda.HessianAccumulator) and a.observer == "minmax"
                  and a.actorder != "group_aware")  # GAR: CPU solver only, too
        backend: Any = fqcuda if on_gpu else solver
        extra: dict[str, Any] = {}
        if a.actorder == "group_aware":
            extra["group_aware"] = True
        if self.needs_float_inputs:  # GPTAQ, Qronos: CPU solver only
            backend = solver
            cross = self._cross.get(t.state)
            if cross is None or cross.samples != samples:
                raise RuntimeError(
                    f"layer {t.name!r}: {self.variant} needs the float model's inputs of every "
                    f"sample ({samples} tokens seen, {0 if cross is None else cross.samples} "
                    "paired)")
            extra["dxxt"] = cross.dxxt()
            if self.qronos:
                extra["qronos"] = True
            else:
                extra["gptaq_alpha"] = self.gptaq_alpha
        res = backend.gptq_quantize(
            w, h, bits=a.num_bits, symmetric=a.symmetric, group_size=a.effective_group_size,
            act_order=a.actorder is not None, static_groups=a.actorder == "static",
            block_size=self.recipe.block_size, damp_percent=self.recipe.dampening_frac,
            observer=a.observer, name=t.name, **self.solver_options, **extra,
        )
        rtn_loss = None
        if self.report_rtn_loss:
            rtn_loss = solver.rtn_quantize(
                w, bits=a.num_bits, symmetric=a.symmetric, group_size=a.effective_group_size,
                observer=a.observer, hessian=h, name=t.name, **self.solver_options).loss
        del h
        seconds = time.perf_counter() - t0
        attempts = [float(x) for x in res.damp_attempts]
        if len(attempts) > 1:
            warnings.warn(
                f"layer {t.name!r}: the damped Hessian was not positive definite at "
                f"dampening_frac={attempts[0]:.3g}; raised to {float(res.damp_frac):.3g} "
                f"(tried {', '.join(f'{x:.3g}' for x in attempts)})", RuntimeWarning,
                stacklevel=2)
        return self.apply(
            t, res, subset, method=self.variant,
            loss=float(res.loss), samples=samples,
            seconds=seconds, damp_frac=float(res.damp_frac), damp_attempts=attempts,
            dead_columns=len(res.dead_columns), rtn_loss=rtn_loss)

