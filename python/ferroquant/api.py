"""The public entry point: ``quantize(model, recipe, calibration)``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .calibration import CalibrationSet, from_tensors
from .config import GPTQ
from .modifiers import GPTQModifier, Modifier, QuantizationModifier, WeightModifier
from .pipeline import SequentialPipeline
from .report import QuantizationReport

if TYPE_CHECKING:
    from .formats.feasibility import TargetLayer

__all__ = ["quantize", "target_layers"]

METHODS = ("gptq", "qronos", "gptaq", "rtn")


def target_layers(model: nn.Module, recipe: GPTQ | dict[str, Any] | str | Path
                  ) -> list[TargetLayer]:
    """The layers ``recipe`` quantizes in ``model`` (the modifiers' own target resolution: inside
    the decoder blocks by any match, outside them only by full name or regex), with what a
    checkpoint format needs to know of each."""
    from .blocks import find_blocks, linear_weight
    from .formats.feasibility import TargetLayer

    r = GPTQ.coerce(recipe)
    per_block, outside = WeightModifier(r).resolve_targets(
        model, find_blocks(model, r.sequential_targets))
    out = []
    for t in [t for ts in per_block for t in ts] + outside:
        w, transposed = linear_weight(t.module)
        out.append(TargetLayer(t.name, int(w.shape[0]), int(w.shape[1]), t.args, transposed))
    return out


def _checkpoint_plan(model: nn.Module, recipe: GPTQ, format: str | None,
                     checkpoint_format: str | None, hint: Literal["api", "cli"]
                     ) -> tuple[dict[str, Any], str | None]:
    """What the checkpoint will be (format, GPTQ version, scale dtype), checked against every
    target layer before any calibration work; and a note to show the user, if any."""
    from .formats import feasibility

    if format is None:  # no format named: scales stay in the model's dtype
        return {"format": None, "checkpoint_format": None,
                "scale_dtype": feasibility.model_dtype(model)}, None

    layers = target_layers(model, recipe)
    fmt = feasibility.canonical_format(format)
    ckpt, note = feasibility.resolve_checkpoint_format(
        fmt, checkpoint_format, any(not la.args.symmetric for la in layers), hint=hint)
    feasibility.check_feasible(layers, fmt, ckpt, hint=hint, recipe=recipe)
    return {"format": fmt, "checkpoint_format": ckpt,
            "scale_dtype": feasibility.scale_dtype_for(fmt, ckpt, feasibility.model_dtype(model))}, note


def with_method(recipe: GPTQ, method: str | None) -> GPTQ:
    """``recipe`` with the GPTQ variant ``method`` names (None or ``"rtn"``: unchanged)."""
    if method == "gptq":
        return recipe.model_copy(update={"qronos": False, "gptaq_alpha": None})
    if method == "qronos":
        return recipe.model_copy(update={"qronos": True, "gptaq_alpha": None})
    if method == "gptaq":
        return recipe.model_copy(update={"qronos": False,
                                         "gptaq_alpha": recipe.gptaq_alpha or 0.25})
    return recipe


def quantize(
    model: nn.Module,
    recipe: GPTQ | dict[str, Any] | str | Path,
    calibration: CalibrationSet | torch.Tensor | list[torch.Tensor],
    *,
    method: Literal["gptq", "qronos", "gptaq", "rtn"] | None = None,
    format: str | None = None,
    checkpoint_format: str | None = None,
    device: str | torch.device | None = "auto",
    show_progress: bool = True,
    report_rtn_loss: bool = False,
    batched: bool | None = None,
    _hint: Literal["api", "cli"] = "api",
) -> QuantizationReport:
    """Quantizes ``model`` in place, block by block.

    Args:
        model: a Hugging Face causal LM (or any model whose decoder blocks sit in an
            ``nn.ModuleList``; see ``GPTQ.sequential_targets`` otherwise).
        recipe: a :class:`GPTQ`, a dict of its fields, a preset name (``"W4A16"``) or the path of
            a YAML/JSON recipe file.
        calibration: a :class:`CalibrationSet` (see :mod:`ferroquant.calibration`), or token ids
            (a ``[n, L]`` tensor or a list of tensors) used as they are.
        method: ``"gptq"`` (the :class:`~ferroquant.modifiers.GPTQModifier`, plain GPTQ
            whatever the recipe's ``qronos``/``gptaq_alpha``), ``"qronos"`` or ``"gptaq"`` (the
            same modifier fitting each layer to the float model's output: the recipe's
            ``qronos=True``, or its ``gptaq_alpha`` (0.25 when unset)), ``"rtn"``
            (round-to-nearest with the recipe's observer, no Hessian:
            :class:`~ferroquant.modifiers.QuantizationModifier`), or None: the recipe's own
            (plain GPTQ unless it sets ``qronos`` or ``gptaq_alpha``).
        format: the checkpoint format this model will be saved in (``"gptq"`` or
            ``"compressed-tensors"``). Given, every target layer is checked against it before
            any calibration work, and scales are rounded to the dtype that format stores them
            in (GPTQ: float16; compressed-tensors: the model's dtype) *before* codes are chosen,
            so the saved checkpoint is exactly the solved model. None: scales in the model's
            dtype, no format check.
        checkpoint_format: GPTQ only: ``"v1"`` or ``"v2"``; default v1, or v2 when a scheme is
            asymmetric (v1 cannot store a zero point of 0).
        device: where each block is moved while it is quantized (``"auto"``: where the model
            sits; ``"cpu"``, ``"cuda"``, ``"cuda:1"``); blocks not being quantized stay where
            they are. On a GPU the Hessians and the solve run on it through ferroquant's CUDA
            core when it loads (the CPU core otherwise, with a warning).
        show_progress: a progress bar over the blocks and the report's summary printed at the
            end (the full per-layer table: ``report.table()``, or ``report.write(directory)``).
        report_rtn_loss: also compute each layer's round-to-nearest proxy loss on the same
            Hessian (a little extra time), for a per-layer GPTQ-vs-RTN comparison.
        batched: run each block once over all samples stacked (True), one sample at a time
            (False), or decide from the model and the memory the stacked activations need
            (None, default). Both give the same result; stacking is several times faster.

    Returns:
        The per-layer report (also ``model.fq_report``); the recipe is stored as
        ``model.fq_recipe`` and the checkpoint plan as ``model.fq_target``, and every quantized
        module carries ``module.fq_quant`` (:class:`ferroquant.quantized.QuantizedWeight`)
        with its weight replaced by the dequantized values.
    """
    r = GPTQ.coerce(recipe)
    if method is not None and method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    r = with_method(r, method)
    if not isinstance(calibration, CalibrationSet):
        if isinstance(calibration, (torch.Tensor, list, tuple)):
            calibration = from_tensors(calibration)
        else:
            raise TypeError("calibration must be a CalibrationSet or token-id tensors, got "
                            f"{type(calibration).__name__}")
    if len(calibration) == 0:
        static = [k for k, g in r.resolved_groups().items()
                  if g.input_activations is not None and not g.input_activations.dynamic]
        if static or r.kv_cache_scheme is not None:
            what = ([f"config group(s) {', '.join(static)}"] if static else []) + (
                ["kv_cache_scheme"] if r.kv_cache_scheme is not None else [])
            raise ValueError(f"the calibration set is empty, but {' and '.join(what)} calibrate "
                             "static activation scales, which need calibration samples")
        raise ValueError("the calibration set is empty")
    target, note = _checkpoint_plan(model, r, format, checkpoint_format, _hint)
    if note and show_progress:
        from tqdm.auto import tqdm

        tqdm.write(f"note: {note}")
    modifier: Modifier = (
        GPTQModifier(r, report_rtn_loss=report_rtn_loss, scale_dtype=target["scale_dtype"])
        if method != "rtn" else QuantizationModifier(r, scale_dtype=target["scale_dtype"]))
    pipeline = SequentialPipeline(model, [modifier], device=device, show_progress=show_progress,
                                  batched=batched, forward_dtype=r.forward_dtype,
                                  sequential_targets=r.sequential_targets)
    report = pipeline.run(calibration)
    model.fq_target = target
    if show_progress:
        from tqdm.auto import tqdm

        tqdm.write(report.summary())
    return report
