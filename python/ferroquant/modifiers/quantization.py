"""Quantization as a modifier: what every quantization modifier does with a layer - its weights
solved or rounded, its input/output activations and its attention's KV cache quantized
(:class:`WeightModifier`, llm-compressor's ``QuantizationMixin``) - and round-to-nearest
weights with the recipe's observer and no Hessian (:class:`QuantizationModifier`,
``--method rtn``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import activations, solver
from ..activations import ActivationQuantizer, KVCacheQuantizer
from ..blocks import Blocks
from ..config import GPTQ, QuantizationScheme
from ..quantized import ATTR, QuantizedWeight
from ..report import LayerReport
from .base import KVTarget, Modifier, Target

__all__ = ["QuantizationModifier", "WeightModifier"]


@dataclass(eq=False)
class Stats:
    """What a target's inputs feed: the modifier's own statistic (e.g. a Hessian; None for
    round-to-nearest) and the static input scale's observer. Modules fed the very same tensor
    share one when their input schemes agree."""

    core: Any
    observer: ActivationQuantizer | None
    samples: int = 0  # tokens seen


class WeightModifier(Modifier):
    """Quantizes the recipe's targets; subclasses choose how the weights are solved."""

    shares_inputs = True

    def __init__(self, recipe: GPTQ, *, scale_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.groups = recipe.resolved_groups()
        # scales are rounded to the dtype the checkpoint stores them in before codes are chosen
        self.scale_dtype = scale_dtype or torch.float32
        self.solver_options: dict[str, Any] = (
            {} if scale_dtype in (None, torch.float32) else {"scale_dtype": scale_dtype})
        self.seconds = {"hessian": 0.0, "solve": 0.0}

    def scheme_for(self, name: str, module: nn.Module, in_block: bool
                   ) -> QuantizationScheme | None:
        return self.recipe.scheme_for(name, module, in_block=in_block, groups=self.groups)

    def describe(self) -> str:
        return (f"targets per group: {[g.targets for g in self.groups.values()]}, "
                f"ignore: {self.recipe.ignore}")

    @property
    def observes_inputs(self) -> bool:
        """Whether some group calibrates a static input scale."""
        return any(g.input_activations is not None and not g.input_activations.dynamic
                   for g in self.groups.values())

    # ---- the KV cache -------------------------------------------------------------------

    def resolve_kv_targets(self, model: nn.Module, blocks: Blocks) -> list[list[KVTarget]]:
        kv = self.recipe.kv_cache_scheme
        if kv is None:
            return super().resolve_kv_targets(model, blocks)
        per_block = []
        for i, (bname, block) in enumerate(zip(blocks.names, blocks.modules)):
            found = activations.attention_modules(block, bname)
            targets = []
            for name, attn in found:
                q = KVCacheQuantizer.for_args(kv)
                q.storage_dtype = self.scale_dtype
                targets.append(KVTarget(name, attn, q, i))
            per_block.append(targets)
        if not any(per_block):
            seen = activations.attention_like(model)
            raise ValueError(
                "kv_cache_scheme quantizes the keys and values attention modules cache, found as "
                "modules with k_proj and v_proj children taking a cache argument; this model "
                f"({type(model).__name__}) has none. Attention modules it has: "
                f"{'; '.join(seen) if seen else 'none found'}")
        return per_block

    # ---- statistics -----------------------------------------------------------------------

    def new_core_state(self, t: Target, x: torch.Tensor) -> Any:
        """The modifier's own statistic for ``t`` (None: it needs none)."""
        return None

    def add_core(self, t: Target, core: Any, x: torch.Tensor, label: str) -> None:
        """Folds one sample's ``[tokens, features]`` input into the statistic."""

    def new_state(self, t: Target, x: torch.Tensor) -> Stats:
        obs = ActivationQuantizer(t.inp.args) if t.static_input else None  # type: ignore[union-attr]
        return Stats(self.new_core_state(t, x), obs)

    def add_inputs(self, t: Target, state: Stats, rows: list[torch.Tensor], label: str) -> None:
        for part in rows:
            if state.core is not None:
                self.add_core(t, state.core, part, label)
            if state.observer is not None:
                state.observer.observe(part)
            state.samples += int(part.shape[0])

    def can_share(self, a: Target, b: Target) -> bool:
        ia = a.inp.args if a.static_input else None  # type: ignore[union-attr]
        ib = b.inp.args if b.static_input else None  # type: ignore[union-attr]
        return self.shares_inputs and ia == ib

    # ---- the lifecycle --------------------------------------------------------------------

    def install_block_hooks(self, block: int, add_pre: Callable[..., None],
                            add_post: Callable[..., None]) -> None:
        for t in self.per_block[block]:
            if t.inp is not None:
                add_pre(t.live, activations.input_hook(t.inp))
            if t.out is not None:
                add_post(t.live, activations.output_hook(t.out))
        for k in self.kv_per_block[block]:
            add_pre(k.live, activations.kv_hook(lambda _m, q=k.quant: q), with_kwargs=True)

    def on_block_end(self, block: int) -> None:
        for t in self.per_block[block]:
            if t.inp is not None or t.out is not None:
                activations.attach(t.module, input=t.inp, output=t.out)
        for k in self.kv_per_block[block]:
            if not k.quant.frozen:
                raise RuntimeError(
                    f"attention {k.name!r} never handed keys and values to its cache during "
                    "calibration, so kv_cache_scheme has nothing to calibrate; the model's "
                    "attention must call its cache's update()")
            activations.attach(k.module, kv=k.quant)

    def end_calibration(self, model: nn.Module) -> None:
        super().end_calibration(model)
        model.fq_recipe = self.recipe

    def describe_kv(self) -> str:
        n = sum(map(len, self.kv_per_block))
        kv = self.recipe.kv_cache_scheme
        return "" if kv is None or not n else f"{kv.describe()} on {n} attention modules"

    def abort(self) -> None:
        super().abort()
        for t in self.all_targets():
            activations.detach(t.module)
        for ks in self.kv_per_block:
            for k in ks:
                activations.detach(k.module)
                k.live = k.module

    def rollback(self, t: Target, weight: torch.Tensor) -> None:
        super().rollback(t, weight)
        if ATTR in t.module.__dict__:
            delattr(t.module, ATTR)
        for q in (t.inp, t.out):
            if q is not None:
                q.enabled, q.scale, q.zero_point = False, None, None

    # ---- quantizing one layer -------------------------------------------------------------

    def quantize_rtn(self, t: Target, subset: int, note: str = "") -> LayerReport:
        """Round-to-nearest of ``t``'s weight with its observer (no Hessian); FP8 weights are
        always rounded to nearest."""
        w, _ = self.weight_of(t)
        a = t.args
        t0 = time.perf_counter()
        if a.type == "float":
            res = solver.fp8_quantize(w, strategy=str(a.strategy), name=t.name,
                                      scale_dtype=self.scale_dtype)
            method = "rtn-fp8"
        else:
            res = solver.rtn_quantize(w, bits=a.num_bits, symmetric=a.symmetric,
                                      group_size=a.effective_group_size, observer=a.observer,
                                      name=t.name, **self.solver_options)
            method = "rtn"
        return self.apply(t, res, subset, method=method, loss=float(res.loss),
                          samples=t.state.samples if t.state is not None else 0,
                          seconds=time.perf_counter() - t0, note=note)

    def _quantize_activations(self, t: Target) -> None:
        """Freezes ``t``'s static input scale from what its inputs showed and turns its
        activation quantization on: the module's next forward is the quantized one."""
        if t.static_input:
            obs = t.state.observer if isinstance(t.state, Stats) else None
            if obs is None or obs.batches == 0:
                raise ValueError(
                    f"layer {t.name!r}: its static input scale ({t.inp.args.describe()}) saw no "  # type: ignore[union-attr]
                    "calibration token; give calibration data that reaches it, or use a "
                    "dynamic scheme")
            obs.freeze(self.scale_dtype)
            t.inp.scale, t.inp.zero_point = obs.scale, obs.zero_point  # type: ignore[union-attr]
        for q in (t.inp, t.out):
            if q is not None:
                q.enabled = True
        if t.block < 0 and (t.inp is not None or t.out is not None):
            activations.attach(t.module, input=t.inp, output=t.out)  # no block end to wait for

    def apply(self, t: Target, res: Any, subset: int, *, method: str, loss: float,
              samples: int, seconds: float, damp_frac: float = float("nan"),
              damp_attempts: list[float] | None = None, dead_columns: int = 0,
              rtn_loss: float | None = None, note: str = "") -> LayerReport:
        """Writes a solver result into the model: the dequantized weight replaces the float one
        (exactly what the checkpoint writers will store) and ``module.fq_quant`` keeps the
        codes, scales, zeros and ``g_idx``; the layer's activation quantization starts."""
        _, transposed = self.weight_of(t)
        a = t.args
        qw = QuantizedWeight(codes=res.codes.cpu(), scales=res.scales.cpu(),
                             zeros=res.zeros.cpu(), g_idx=res.g_idx.cpu(), args=a)
        deq = qw.dequantize(torch.float32)
        diff = (deq - res.dequantized.cpu().float()).abs().max().item() if deq.numel() else 0.0
        tol = 1e-5 * max(1.0, float(qw.scales.abs().max())) if qw.scales.numel() else 1e-5
        if not diff <= tol:
            raise RuntimeError(f"layer {t.name!r}: the solver's dequantized weight differs from "
                               f"scale*(code-zero) by {diff:.3g}; codes/scales/zeros are "
                               "inconsistent")
        gs = a.effective_group_size
        if a.actorder in ("static", "group_aware") and gs > 0 and not torch.equal(
                qw.g_idx.long(), torch.arange(qw.g_idx.numel()) // gs):
            raise RuntimeError(f"layer {t.name!r}: actorder {a.actorder!r} keeps g_idx "
                               "trivial, but the solver returned a permuted one")
        t.write_weight(deq.t() if transposed else deq)
        setattr(t.module, ATTR, qw)
        self._quantize_activations(t)
        t.state = None  # free the statistics
        acts = [f"{kind} {q.args.describe()}" for kind, q in (("input", t.inp),
                                                              ("output", t.out)) if q is not None]
        return LayerReport(
            name=t.name, block=t.block, subset=subset, out_features=qw.out_features,
            in_features=qw.in_features, bits=a.num_bits, group_size=a.effective_group_size,
            symmetric=a.symmetric, actorder=a.actorder, method=method, loss=loss,
            damp_frac=damp_frac, damp_attempts=list(damp_attempts or []),
            dead_columns=dead_columns, samples=samples, seconds=seconds, rtn_loss=rtn_loss,
            note=note, activations="; ".join(acts),
        )


class QuantizationModifier(WeightModifier):
    """Round-to-nearest weights with the recipe's observer (``minmax`` or ``mse``; FP8 weights
    by their absolute maximum): no Hessian. Without static activation scales each block's
    targets are quantized before its pass, which only carries their error to the next block;
    with them, each target is quantized in the pass right after its inputs were observed
    (so they carry every upstream layer's quantization), before it runs."""

    def __init__(self, recipe: GPTQ, *, scale_dtype: torch.dtype | None = None) -> None:
        super().__init__(recipe, scale_dtype=scale_dtype)
        self.needs_inputs = self.observes_inputs
        self.sequential = True

    def on_block_start(self, block: int, targets: list[Target]) -> list[LayerReport]:
        return [self.quantize_rtn(t, 0) for t in targets]

    def on_module_ready(self, t: Target, subset: int) -> LayerReport:
        return self.quantize_rtn(t, subset)
