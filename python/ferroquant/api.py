"""The public entry point: ``quantize(model, recipe, calibration)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationSet, from_tensors
from .config import GPTQ
from .pipeline import QuantizationReport, run_gptq

__all__ = ["quantize"]


def quantize(
    model: nn.Module,
    recipe: GPTQ | dict[str, Any] | str | Path,
    calibration: CalibrationSet | torch.Tensor | list[torch.Tensor],
    *,
    device: str | torch.device | None = "cpu",
    show_progress: bool = True,
    report_rtn_loss: bool = False,
    batched: bool | None = None,
) -> QuantizationReport:
    """GPTQ-quantizes ``model`` in place, block by block.

    Args:
        model: a Hugging Face causal LM (or any model whose decoder blocks sit in an
            ``nn.ModuleList``; see ``GPTQ.sequential_targets`` otherwise).
        recipe: a :class:`GPTQ`, a dict of its fields, a preset name (``"W4A16"``) or the path of
            a YAML/JSON recipe file.
        calibration: a :class:`CalibrationSet` (see :mod:`ferroquant.calibration`), or token ids
            (a ``[n, L]`` tensor or a list of tensors) used as they are.
        device: where each block is moved while it is quantized (``"cpu"``, ``"cuda"``,
            ``"cuda:1"``, or ``"auto"``: the GPU the model sits on, else the CPU); blocks not
            being quantized stay where they are. On a GPU the Hessians and the solve run on it
            through ferroquant's CUDA core when it loads (torch's CPU copy otherwise).
        show_progress: a progress bar over the blocks and the per-layer table printed at the end.
        report_rtn_loss: also compute each layer's round-to-nearest proxy loss on the same
            Hessian (a little extra time), for a per-layer GPTQ-vs-RTN comparison.
        batched: run each block once over all samples stacked (True), one sample at a time
            (False), or decide from the model and the memory the stacked activations need
            (None, default). Both give the same result; stacking is several times faster.

    Returns:
        The per-layer report (also ``model.fq_report``); the recipe is stored as
        ``model.fq_recipe``, and every quantized module carries ``module.fq_quant``
        (:class:`ferroquant.quantized.QuantizedWeight`) with its weight replaced by the
        dequantized values.
    """
    r = GPTQ.coerce(recipe)
    if not isinstance(calibration, CalibrationSet):
        if isinstance(calibration, (torch.Tensor, list, tuple)):
            calibration = from_tensors(calibration)
        else:
            raise TypeError("calibration must be a CalibrationSet or token-id tensors, got "
                            f"{type(calibration).__name__}")
    report = run_gptq(model, r, calibration, device=device, show_progress=show_progress,
                      report_rtn_loss=report_rtn_loss, batched=batched)
    if show_progress:
        from tqdm.auto import tqdm

        tqdm.write(report.table())
    return report
