"""Weight quantization as a modifier: what every weight modifier does with a solved layer
(:class:`WeightModifier`), and round-to-nearest with the recipe's observer and no Hessian
(:class:`QuantizationModifier`, ``--method rtn``)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .. import solver
from ..config import GPTQ, QuantizationArgs
from ..quantized import ATTR, QuantizedWeight
from ..report import LayerReport
from .base import Modifier, Target

__all__ = ["QuantizationModifier", "WeightModifier"]


class WeightModifier(Modifier):
    """Quantizes the weights of the recipe's targets; subclasses choose how."""

    def __init__(self, recipe: GPTQ, *, scale_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.groups = recipe.resolved_groups()
        # scales are rounded to the dtype the checkpoint stores them in before codes are chosen
        self.solver_options: dict[str, Any] = (
            {} if scale_dtype in (None, torch.float32) else {"scale_dtype": scale_dtype})
        self.seconds = {"hessian": 0.0, "solve": 0.0}

    def args_for(self, name: str, module: nn.Module, in_block: bool) -> QuantizationArgs | None:
        return self.recipe.args_for(name, module, in_block=in_block, groups=self.groups)

    def describe(self) -> str:
        return (f"targets per group: {[g.targets for g in self.groups.values()]}, "
                f"ignore: {self.recipe.ignore}")

    def end_calibration(self, model: nn.Module) -> None:
        super().end_calibration(model)
        model.fq_recipe = self.recipe

    def rollback(self, t: Target, weight: torch.Tensor) -> None:
        super().rollback(t, weight)
        if ATTR in t.module.__dict__:
            delattr(t.module, ATTR)

    def quantize_rtn(self, t: Target, subset: int, note: str = "") -> LayerReport:
        """Round-to-nearest of ``t``'s weight with its observer (no Hessian)."""
        w, _ = self.weight_of(t)
        a = t.args
        t0 = time.perf_counter()
        res = solver.rtn_quantize(w, bits=a.num_bits, symmetric=a.symmetric,
                                  group_size=a.effective_group_size, observer=a.observer,
                                  name=t.name, **self.solver_options)
        return self.apply(t, res, subset, method="rtn", loss=float(res.loss),
                          samples=t.state.samples if t.state is not None else 0,
                          seconds=time.perf_counter() - t0, note=note)

    def apply(self, t: Target, res: Any, subset: int, *, method: str, loss: float,
              samples: int, seconds: float, damp_frac: float = float("nan"),
              damp_attempts: list[float] | None = None, dead_columns: int = 0,
              rtn_loss: float | None = None, note: str = "") -> LayerReport:
        """Writes a solver result into the model: the dequantized weight replaces the float one
        (exactly what the checkpoint writers will store) and ``module.fq_quant`` keeps the
        codes, scales, zeros and ``g_idx``."""
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
        t.write_weight(deq.t() if transposed else deq)
        setattr(t.module, ATTR, qw)
        t.state = None  # free the statistics
        return LayerReport(
            name=t.name, block=t.block, subset=subset, out_features=qw.out_features,
            in_features=qw.in_features, bits=a.num_bits, group_size=a.effective_group_size,
            symmetric=a.symmetric, actorder=a.actorder, method=method, loss=loss,
            damp_frac=damp_frac, damp_attempts=list(damp_attempts or []),
            dead_columns=dead_columns, samples=samples, seconds=seconds, rtn_loss=rtn_loss,
            note=note,
        )


class QuantizationModifier(WeightModifier):
    """Round-to-nearest weights with the recipe's observer (``minmax`` or ``mse``): no
    calibration statistics, so each block's targets are quantized before its pass and the
    pass only carries their error to the next block."""

    def on_block_start(self, block: int, targets: list[Target]) -> list[LayerReport]:
        return [self.quantize_rtn(t, 0) for t in targets]

    def on_module_ready(self, t: Target, subset: int) -> LayerReport:
        return self.quantize_rtn(t, subset)
