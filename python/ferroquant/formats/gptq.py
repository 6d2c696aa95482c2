"""GPTQ checkpoint layout (v1 and v2), as read by transformers/optimum, GPTQModel and vLLM.

Per quantized Linear ``p`` (``in`` inputs, ``out`` outputs, ``ng`` groups, ``b`` bits):

- ``p.qweight`` int32 ``[in*b/32, out]``: codes packed along the input dimension, lowest input
  index in the lowest bits (3-bit: 32 values in 3 words, straddling word edges);
- ``p.qzeros`` int32 ``[ng, out*b/32]``: zero points packed along the output dimension; v1
  stores ``zero - 1`` (the historical AutoGPTQ off-by-one), v2 the raw zero;
- ``p.scales`` fp16 ``[ng, out]``; ``p.g_idx`` int32 ``[in]`` (group of each input column);
- ``p.bias`` fp16 ``[out]`` when the layer has one.

Weight = ``scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch

from .. import solver
from ..config import QuantizationArgs
from ..headers.common import canonical_checkpoint_format
from ..headers.gptq import (
    GPTQ_BITS,
    GPTQSettings,
    check_layer_header,
    quantized_prefixes,  # noqa: F401  (re-exported for the readers)
)
from .common import CheckpointError, CheckpointFiles, LayerCodes, recipe_get

TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


# Scales are stored in float16 whatever the model's dtype (what every GPTQ loader expects).
SCALE_DTYPE = torch.float16


def version_of(checkpoint_format: str) -> int:
    """1 or 2 for a canonical ``checkpoint_format`` ('gptq' or 'gptq_v2'; see
    :func:`ferroquant.formats.feasibility.canonical_checkpoint_format` for the spellings)."""
    return 1 if canonical_checkpoint_format(checkpoint_format) == "gptq" else 2


def layout_problem(out_features: int, in_features: int, bits: int) -> str | None:
    """Why GPTQ's packed layout cannot hold a layer of this shape and width, or None."""
    if bits not in GPTQ_BITS:
        return f"{bits}-bit weights cannot be stored in GPTQ format (bits must be one of {GPTQ_BITS})"
    step = 32 // math.gcd(bits, 32)
    if in_features * bits % 32:
        return (f"in_features={in_features} x {bits} bits is not a whole number of 32-bit words, "
                f"which GPTQ's qweight needs (in_features must be a multiple of {step})")
    if out_features * bits % 32:
        return (f"out_features={out_features} x {bits} bits is not a whole number of 32-bit words, "
                f"which GPTQ's qzeros needs (out_features must be a multiple of {step})")
    return None


V1_ASYMMETRIC = "asymmetric scheme: GPTQ v1 stores zero-1 in unsigned bits and cannot store a zero point of 0"


def check_layer(name: str, layer: LayerCodes, version: int) -> None:
    """Refuse what the GPTQ layout cannot store, saying what to do instead."""
    problem = layout_problem(layer.out_features, layer.in_features, layer.bits)
    if problem is not None:
        raise CheckpointError(f"{name}: {problem}; use format='compressed-tensors' or add this layer to ignore")
    if version == 1 and bool((layer.zeros <= 0).any()):
        o, g = (int(v) for v in (layer.zeros <= 0).nonzero()[0])
        raise CheckpointError(
            f"{name}: zero point 0 (row {o}, group {g}) cannot be stored in GPTQ v1, which "
            "stores zero-1 in unsigned bits and would wrap it to 2**bits-1; save with "
            "checkpoint_format='gptq_v2' or format='compressed-tensors'"
        )


def layer_tensors(prefix: str, layer: LayerCodes, version: int) -> dict[str, torch.Tensor]:
    check_layer(prefix, layer, version)
    b = layer.bits
    codes = layer.codes.to(torch.uint8).contiguous()
    zeros = layer.zeros.to(torch.int32).t().contiguous()  # [ng, out]
    out = {
        f"{prefix}.qweight": solver.pack_gptq_qweight(codes, b),
        f"{prefix}.qzeros": solver.pack_gptq_qzeros(zeros, b, version=version),
        f"{prefix}.scales": layer.scales.t().contiguous().to(SCALE_DTYPE),
        f"{prefix}.g_idx": layer.g_idx.to(torch.int32).contiguous(),
    }
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.detach().to(torch.float16).contiguous()
    return out


def build_config(
    layers: dict[str, LayerCodes], *, recipe: Any, checkpoint_format: str, dynamic: bool,
) -> dict[str, Any]:
    """``quantization_config`` (also written as quantize_config.json)."""
    keys = {n: _layer_key(layer) for n, layer in layers.items()}
    base, _ = Counter(keys.values()).most_common(1)[0]
    bits, group_size, sym, desc_act = base
    dyn: dict[str, dict[str, Any]] = {}
    for n, k in keys.items():
        if k == base:
            continue
        if not dynamic:
            raise ValueError(
                f"{n}: GPTQ format has one global bits/group_size/sym/desc_act "
                f"({bits}, {group_size}, {sym}, {desc_act}) but this layer has {k}; save with "
                "format='compressed-tensors', or pass gptq_dynamic=True to write GPTQModel-style "
                "per-module 'dynamic' overrides (read by GPTQModel and vLLM)"
            )
        dyn[f"+:^{re.escape(n)}$"] = dict(zip(("bits", "group_size", "sym", "desc_act"), k))
    orders = {layer.args.actorder for layer in layers.values()}
    actorder = orders.pop() if len(orders) == 1 else None
    if actorder is None and len(orders) == 0:
        actorder = recipe_get(recipe, "actorder")
    damp = float(recipe_get(recipe, "dampening_frac", 0.01) or 0.01)
    from .. import __version__

    cfg: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp,
        "true_sequential": bool(recipe_get(recipe, "true_sequential", True)),
        "static_groups": actorder == "static",
        "lm_head": any(n == "lm_head" or n.endswith(".lm_head") for n in layers),
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"ferroquant:{__version__}"],
            "damp_percent": damp,
            "static_groups": actorder == "static",
            "true_sequential": bool(recipe_get(recipe, "true_sequential", True)),
        },
    }
    if dyn:
        cfg["dynamic"] = dyn
    return cfg


def exclude_unquantized(cfg: dict[str, Any], quantized: list[str], unquantized: list[str]) -> None:
    """Tell loaders which Linear layers in the decoder blocks are *not* quantized: GPTQModel and
    vLLM read negative ``dynamic`` rules; optimum/transformers read ``modules_in_block_to_quantize``
    (module-name suffixes inside a block)."""
    unq = [n for n in unquantized if n.split(".")[-1] != "lm_head"]
    if not unq:
        return
    dyn = cfg.setdefault("dynamic", {})
    for n in unq:
        dyn[f"-:^{re.escape(n)}$"] = {}
    suffixes = sorted({m.group(1) for n in quantized if (m := re.match(r"^.*?\.\d+\.(.+)$", n))})
    if suffixes and not any(n.endswith(sfx) for n in unq for sfx in suffixes):
        cfg["modules_in_block_to_quantize"] = [suffixes]


def _layer_key(layer: LayerCodes) -> tuple[int, int, bool, bool]:
    # desc_act marks a non-trivial g_idx; "static" act-order keeps groups contiguous (trivial
    # g_idx), so loaders can take their fast no-reorder path.
    desc = layer.args.actorder == "group" or not layer.has_trivial_g_idx()
    return (layer.bits, layer.group_size, bool(layer.args.symmetric), desc)


# ---------------------------------------------------------------------------------------------
# Reading.


def read_layer(
    files: CheckpointFiles, prefix: str, settings: GPTQSettings,
    in_features: int | None = None, out_features: int | None = None,
) -> LayerCodes:
    """Decode one layer's tensors into codes, validating every shape against the config."""
    h = check_layer_header(files, prefix, settings, in_features, out_features)
    bits, gs, sym, in_features, out, ng, why = (h.bits, h.group_size, h.sym, h.in_features,
                                                h.out_features, h.n_groups, h.why)
    if f"{prefix}.g_idx" in files:
        g_idx = files.get(f"{prefix}.g_idx").to(torch.int32)
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= ng):
            raise CheckpointError(
                f"{files.info(prefix + '.g_idx').file}: tensor '{prefix}.g_idx' has values in "
                f"[{int(g_idx.min())}, {int(g_idx.max())}] but there are {ng} groups ({why})"
            )
    else:
        from .common import default_g_idx

        g_idx = default_g_idx(in_features, gs)
    codes = solver.unpack_gptq_qweight(files.get(f"{prefix}.qweight"), bits, in_features)
    zeros = solver.unpack_gptq_qzeros(files.get(f"{prefix}.qzeros"), bits, out, version=settings.version)
    scales = files.get(f"{prefix}.scales").to(torch.float32)
    bias = files.get(f"{prefix}.bias") if f"{prefix}.bias" in files else None
    if bias is not None and tuple(bias.shape) != (out,):
        raise CheckpointError(
            f"{files.info(prefix + '.bias').file}: tensor '{prefix}.bias' has shape {list(bias.shape)}, expected [{out}]"
        )
    trivial = torch.equal(g_idx, _trivial(in_features, gs))
    args = QuantizationArgs(
        num_bits=bits,
        symmetric=sym,
        strategy="channel" if gs == -1 else "group",
        group_size=None if gs == -1 else gs,
        actorder=("static" if settings.static_groups else None) if trivial else "group",
    )
    return LayerCodes(codes.to(torch.uint8), scales.t().contiguous(), zeros.t().contiguous().to(torch.int32),
                      g_idx, args, bias)


def _trivial(in_features: int, gs: int) -> torch.Tensor:
    from .common import default_g_idx

    return default_g_idx(in_features, gs)
