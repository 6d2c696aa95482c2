"""What a checkpoint format can hold, decided before any calibration: the dtype scales are
stored in, the layers a recipe will quantize, whether every one of them fits the chosen layout
(all offenders reported at once, with ways out), and what besides integer weights a recipe or
model quantizes (FP8 weights, activations, the KV cache), which only compressed-tensors holds;
the format and GPTQ version names are re-exported from the torch-free
:mod:`ferroquant.headers.common`."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from ..headers.common import (
    CHECKPOINT_FORMAT_ALIASES,
    FORMAT_ALIASES,
    canonical_checkpoint_format,
    canonical_format,
    format_of,
)
from . import compressed_tensors as ct
from . import gptq
from .common import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT_ALIASES",
    "FORMAT_ALIASES",
    "TargetLayer",
    "canonical_checkpoint_format",
    "canonical_format",
    "check_feasible",
    "check_gptq_holds",
    "format_of",
    "layer_extras",
    "resolve_checkpoint_format",
    "scale_dtype_for",
]

V2_NOTE = "asymmetric scheme: writing GPTQ v2 (v1 cannot store a zero point of 0)"

Hint = Literal["api", "cli"]


def model_dtype(model: Any) -> torch.dtype:
    """The dtype a model's floating weights are in (what compressed-tensors stores scales in):
    the one place both the solve and the writers read it from."""
    dt = getattr(model, "dtype", None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def scale_dtype_for(format: str, checkpoint_format: str | None,
                    model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint stores scales in: float16 for GPTQ (v1 and v2), the model's own
    dtype for compressed-tensors."""
    if canonical_format(format) == "gptq":
        return gptq.SCALE_DTYPE
    return model_dtype


def resolve_checkpoint_format(format: str, checkpoint_format: str | None, any_asymmetric: bool,
                              *, hint: Hint = "api") -> tuple[str | None, str | None]:
    """(canonical checkpoint_format for :func:`ferroquant.formats.save`, a note or None).

    GPTQ defaults to v1 (read by every engine) and to v2 when a scheme is asymmetric, since v1
    stores ``zero - 1`` in unsigned bits and a zero point of 0 would wrap; an explicit v1 with
    an asymmetric scheme is an error. compressed-tensors has no versions: None."""
    fmt = canonical_format(format)
    if fmt != "gptq":
        if checkpoint_format is not None:
            flag = "--checkpoint-format" if hint == "cli" else "checkpoint_format"
            raise CheckpointError(f"{flag} {checkpoint_format!r} applies to the GPTQ format only, "
                                  "not to compressed-tensors")
        return None, None
    if checkpoint_format is None:
        return ("gptq_v2", V2_NOTE) if any_asymmetric else ("gptq", None)
    cf = canonical_checkpoint_format(checkpoint_format)
    if cf == "gptq" and any_asymmetric:
        way = ("--checkpoint-format v2 (or leave it out) or --format compressed-tensors"
               if hint == "cli" else "checkpoint_format='gptq_v2' (or None) or "
               "format='compressed-tensors'")
        raise CheckpointError(f"{gptq.V1_ASYMMETRIC}; use {way}, or a symmetric scheme")
    return cf, None


class TargetLayer(NamedTuple):
    name: str
    out_features: int
    in_features: int
    args: Any  # ferroquant.config.QuantizationArgs
    is_conv1d: bool


FP8_IN_GPTQ = "FP8 weights: GPTQ stores integer codes only"


def _problem(fmt: str, version: int, layer: TargetLayer) -> str | None:
    if fmt == "gptq":
        if layer.args.type == "float":
            return FP8_IN_GPTQ
        p = gptq.layout_problem(layer.out_features, layer.in_features, int(layer.args.num_bits))
        if p is None and version == 1 and not layer.args.symmetric:
            p = gptq.V1_ASYMMETRIC
        return p
    return ct.layout_problem(layer.out_features, layer.in_features, layer.args, layer.is_conv1d)


def _fitting_group_size(layers: list[TargetLayer]) -> int | None:
    """The largest power of two >= 16 dividing every width, below the current group sizes."""
    cap = min(int(la.args.effective_group_size) for la in layers)
    g = math.gcd(*(la.in_features for la in layers))
    best = None
    p = 16
    while p < cap and g % p == 0:
        best = p
        p *= 2
    return best


def layer_extras(layers: dict[str, Any], kv_cache: Any) -> list[str]:
    """What quantized layers (``LayerCodes`` with their activation quantizers) and a KV-cache
    scheme (``ActivationArgs`` or None) hold besides integer weights, one line per distinct
    combination: a model's or checkpoint's :meth:`~ferroquant.config.GPTQ.beyond_integer_weights`."""
    by: dict[str, list[str]] = {}
    for name, la in layers.items():
        parts = ["FP8 weights"] if la.args.type == "float" else []
        parts += [f"{kind} activations {q.args.describe()}" for kind, q in
                  (("input", la.input_act), ("output", la.output_act)) if q is not None]
        if parts:
            by.setdefault(", ".join(parts), []).append(name)
    lines = [(f"{names[0]} and {len(names) - 1} more layer(s)" if len(names) > 2
              else ", ".join(names)) + f": {what}" for what, names in by.items()]
    if kv_cache is not None:
        lines.append(f"kv_cache_scheme {kv_cache.describe()}")
    return lines


def check_gptq_holds(extras: list[str], *, hint: Hint, what: str = "the recipe") -> None:
    """Raise :class:`CheckpointError` when ``extras`` (a recipe's ``beyond_integer_weights()``,
    :func:`layer_extras`) is not empty: the GPTQ format holds integer weights only."""
    if not extras:
        return
    way = "--format compressed-tensors" if hint == "cli" else "format='compressed-tensors'"
    raise CheckpointError(
        f"the GPTQ format holds integer weights only, but {what} also quantizes:\n"
        + "".join(f"  {e}\n" for e in extras)
        + f"ways out: {way} (which holds FP8 weights, activation and KV-cache scales)")


def check_feasible(layers: list[TargetLayer] | list[tuple[Any, ...]], format: str,
                   checkpoint_format: str | None, *, hint: Hint,
                   suggest_other_format: bool = True, recipe: Any = None) -> None:
    """Raise :class:`CheckpointError` listing every layer the chosen format cannot hold, with
    the ways out spelled for where the user is (``hint="cli"``: flags; ``"api"``: keyword
    arguments). The other format is suggested only when it holds every offending layer (and
    ``suggest_other_format``: not when converting from it). With ``recipe`` (a
    :class:`~ferroquant.config.GPTQ`), GPTQ first refuses what it quantizes besides integer
    weights (:meth:`~ferroquant.config.GPTQ.beyond_integer_weights`)."""
    fmt = canonical_format(format)
    version = 0
    if fmt == "gptq":
        if recipe is not None:
            check_gptq_holds(recipe.beyond_integer_weights(), hint=hint)
        version = gptq.version_of(checkpoint_format or "gptq")
    tl = [la if isinstance(la, TargetLayer) else TargetLayer(*la) for la in layers]
    bad = [(la, p) for la in tl if (p := _problem(fmt, version, la)) is not None]
    if not bad:
        return
    cli = hint == "cli"
    other = "compressed-tensors" if fmt == "gptq" else "gptq"
    v1_only = any(p == gptq.V1_ASYMMETRIC for _, p in bad)
    label = {"gptq": "GPTQ v1" if v1_only else "GPTQ", "compressed-tensors": "compressed-tensors"}[fmt]
    lines = [f"{len(bad)} layer(s) cannot be stored in the {label} format:"]
    by_problem: dict[str, list[str]] = {}
    for la, p in bad:
        by_problem.setdefault(p, []).append(la.name)
    lines += [f"  {', '.join(names)}: {p}" for p, names in by_problem.items()]
    ways = []
    per_channel = [TargetLayer(la.name, la.out_features, la.in_features,
                               la.args.model_copy(update={"strategy": "channel", "group_size": None}),
                               la.is_conv1d) for la, _ in bad]
    if not suggest_other_format:
        pass
    elif all(_problem(other, 2, la) is None for la, _ in bad):
        ways.append(f"--format {other}" if cli else f"format={other!r}")
    elif other == "compressed-tensors" and all(_problem(other, 2, la) is None for la in per_channel):
        # only the group size stands in the way there
        ways.append(f"--format {other} --group-size -1" if cli else
                    f"format={other!r} with group_size=-1 (per channel) in the recipe")
    if fmt == "gptq" and version == 1 and all(p == gptq.V1_ASYMMETRIC for _, p in bad):
        ways.append("--checkpoint-format v2" if cli else "checkpoint_format='gptq_v2'")
    if fmt == "compressed-tensors" and all(p.startswith("in_features=") for _, p in bad):
        gs = _fitting_group_size([la for la, _ in bad])
        if cli:
            ways.append("--group-size -1 (per channel)" + (f" or --group-size {gs}" if gs else ""))
        else:
            ways.append("group_size=-1 (per channel)" + (f" or group_size={gs}" if gs else "")
                        + " in the recipe")
    names = [la.name for la, _ in bad]
    if len(names) > 4:  # one regex on the layers' own names instead of a long list
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        alt = short[0] if len(short) == 1 else "(" + "|".join(short) + ")"
        names = [f"re:.*\\.{alt}$"]
    if cli:
        ways.append("leave them unquantized: " + " ".join(
            f"--ignore '{n}'" if n.startswith("re:") else f"--ignore {n}" for n in names))
    else:
        ways.append(f"leave them unquantized: ignore=[..., {', '.join(map(repr, names))}] in "
                    "the recipe")
    lines.append("ways out: " + "; or ".join(ways))
    raise CheckpointError("\n".join(lines))
