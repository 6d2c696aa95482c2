"""compressed-tensors checkpoints, as written by llm-compressor and read by transformers (with
the ``compressed-tensors`` package) and vLLM: each quantized Linear in the layout
:func:`layer_format` picks for it, its activation scales and the KV-cache scales beside it
(:mod:`.ct_activations`).

``pack-quantized`` (integer weights), per quantized Linear ``p`` (``in`` inputs, ``out``
outputs, ``ng`` groups, ``b`` bits):

- ``p.weight_packed`` int32 ``[out, ceil(in*b/32)]``: signed codes ``q - 2**(b-1)`` stored
  shifted back by ``+2**(b-1)`` (so: our unsigned codes), densely bit-packed along each row;
- ``p.weight_scale`` ``[out, ng]`` in the model dtype (``[out, 1]`` per channel);
- ``p.weight_zero_point`` (asymmetric only) int32 ``[ceil(out*b/32), ng]`` packed along dim 0;
- ``p.weight_shape`` int64 ``[2]`` = ``[out, in]``; ``p.weight_g_idx`` int32 ``[in]`` only for
  ``actorder: group``.

``int-quantized`` (8-bit integer weights of a layer whose inputs are quantized too, W8A8):
``p.weight`` int8 ``[out, in]`` = ``code - 128``; ``p.weight_scale`` ``[out, ng]``;
``p.weight_zero_point`` (asymmetric only) int8 ``[out, ng]`` = ``zero - 128``.

``float-quantized`` (FP8 weights): ``p.weight`` float8_e4m3fn ``[out, in]``;
``p.weight_scale`` ``[1]`` per tensor or ``[out, 1]`` per channel, in the model dtype.

Weight = ``weight_scale[o, g] * (q_signed - zp_signed)`` = ``scale * (code - zero)`` (zero 0
for FP8). ``quantization_config.format`` is the one format all config groups use, else
``mixed-precision``, each group naming its own (what compressed-tensors' ``infer_model_format``
writes and its loaders read).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import solver
from ..config import ActivationArgs, QuantizationArgs
from ..headers.compressed_tensors import (  # noqa: F401  (re-exported for the readers)
    FLOAT,
    INT,
    MIXED,
    NAIVE,
    PACK,
    CTSettings,
    GroupScheme,
    check_layer_header,
    quantized_prefixes,
)
from . import ct_activations as acts
from .common import CheckpointError, CheckpointFiles, LayerCodes, default_g_idx

TENSOR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                   "weight")


def layer_format(args: QuantizationArgs, input_act: ActivationArgs | None) -> str:
    """``float-quantized`` for FP8 weights; ``int-quantized`` for 8-bit integer weights whose
    inputs are quantized too (W8A8: int8 kernels read the int8 weight as it is); otherwise
    ``pack-quantized``."""
    if args.type == "float":
        return FLOAT
    if input_act is not None and int(args.num_bits) == 8:
        return INT
    return PACK


def _format_of(layer: LayerCodes) -> str:
    return layer_format(layer.args, None if layer.input_act is None else layer.input_act.args)


def layout_problem(out_features: int, in_features: int, args: QuantizationArgs,
                   is_conv1d: bool = False) -> str | None:
    """Why ``pack-quantized`` cannot hold a layer of this shape and scheme, or None."""
    b = int(args.num_bits)
    if not 1 <= b <= 8:
        return f"{b}-bit weights: pack-quantized supports 1..8 bits"
    if is_conv1d:
        return ("a transformers Conv1D (GPT-2 style): compressed-tensors only quantizes nn.Linear "
                "(GPTQ stores it in Linear orientation)")
    gs = args.effective_group_size
    if gs > 0 and in_features % gs:
        return (f"in_features={in_features} is not a multiple of group_size={gs}; "
                "compressed-tensors requires whole groups")
    return None


def check_layer(name: str, layer: LayerCodes, is_conv1d: bool = False) -> None:
    problem = layout_problem(layer.out_features, layer.in_features, layer.args, is_conv1d)
    if problem is not None:
        raise CheckpointError(
            f"{name}: {problem}. Use format='gptq', a group size that divides it, per-channel "
            "quantization, or ignore this layer"
        )
    if layer.args.symmetric and not layer.is_symmetric_codes():
        raise CheckpointError(
            f"{name}: args say symmetric but some zero points differ from {1 << (layer.bits - 1)}; "
            "compressed-tensors symmetric storage has no zero point"
        )
    fmt = _format_of(layer)
    if fmt == PACK and layer.args.actorder == "group":
        return
    if not layer.has_trivial_g_idx():
        raise ValueError(
            f"{name}: non-contiguous g_idx but actorder is {layer.args.actorder!r}; "
            "compressed-tensors only stores weight_g_idx for actorder='group' in pack-quantized"
            + (f" (this layer is {fmt}: its inputs are quantized too)" if fmt == INT else "")
        )


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[0, 2**b)`` as compressed-tensors' signed int8 ``code - 2**(b-1)``."""
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8).contiguous()


def layer_tensors(prefix: str, layer: LayerCodes, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's tensors in its format (:func:`layer_format`), with its activation scales."""
    check_layer(prefix, layer)
    b = layer.bits
    fmt = _format_of(layer)
    out: dict[str, torch.Tensor] = {}
    if fmt == FLOAT:
        out[f"{prefix}.weight"] = layer.codes.contiguous()
        scale = layer.scales.to(scale_dtype)
        out[f"{prefix}.weight_scale"] = (scale.reshape(1) if layer.args.strategy == "tensor"
                                         else scale).contiguous()
    elif fmt == INT:
        out[f"{prefix}.weight"] = _signed(layer.codes, b)
        out[f"{prefix}.weight_scale"] = layer.scales.to(scale_dtype).contiguous()
        if not layer.args.symmetric:
            out[f"{prefix}.weight_zero_point"] = _signed(layer.zeros, b)
    else:
        out[f"{prefix}.weight_packed"] = solver.pack_ct_weight(
            layer.codes.to(torch.uint8).contiguous(), b)
        out[f"{prefix}.weight_scale"] = layer.scales.to(scale_dtype).contiguous()
        out[f"{prefix}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features],
                                                     dtype=torch.int64)
        if not layer.args.symmetric:
            out[f"{prefix}.weight_zero_point"] = solver.pack_ct_zero_point(
                layer.zeros.to(torch.uint8).contiguous(), b
            )
        if layer.args.actorder == "group":
            out[f"{prefix}.weight_g_idx"] = layer.g_idx.to(torch.int32).contiguous()
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.detach().to(scale_dtype).contiguous()
    out.update(acts.quantizer_tensors(prefix, "input", layer.input_act, scale_dtype))
    out.update(acts.quantizer_tensors(prefix, "output", layer.output_act, scale_dtype))
    return out


def weights_args_dict(args: QuantizationArgs) -> dict[str, Any]:
    """The ``weights`` entry of a config group, as compressed-tensors serialises it."""
    gs = args.effective_group_size
    d: dict[str, Any] = {
        "num_bits": int(args.num_bits),
        "type": args.type,
        "symmetric": bool(args.symmetric),
        "group_size": None if gs <= 0 else int(gs),
        "strategy": args.strategy if args.type == "float" else "channel" if gs <= 0 else "group",
        "dynamic": False,
        "observer": args.observer,
    }
    if args.actorder is not None:
        # group-aware reordering keeps g_idx trivial: to a loader it is static act-order
        d["actorder"] = "static" if args.actorder == "group_aware" else args.actorder
    return d


def build_config(
    layers: dict[str, LayerCodes], *, ignore: list[str], kv_cache: ActivationArgs | None = None,
) -> dict[str, Any]:
    """``quantization_config`` of config.json, with the field names and order compressed-tensors'
    ``ModelCompressor.update_config`` writes: one config group per distinct (weights, input
    and output activations, format)."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name, layer in layers.items():
        ins, outs = (None if q is None else acts.args_dict(q.args)
                     for q in (layer.input_act, layer.output_act))
        g = {"weights": weights_args_dict(layer.args), "input_activations": ins,
             "output_activations": outs, "format": _format_of(layer)}
        key = repr(sorted((k, v if not isinstance(v, dict) else sorted(v.items()))
                          for k, v in g.items()))
        groups.setdefault(key, (g, []))[1].append(name)
    config_groups: dict[str, Any] = {}
    single = len(groups) == 1
    for i, (g, names) in enumerate(groups.values()):
        # One scheme: target the class and list the rest in `ignore` (what llm-compressor
        # writes). Several: exact module names, so no two groups can claim a layer.
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if single else sorted(names), **g}
    if any(layer.args.actorder == "group" for layer in layers.values()):
        warnings.warn(
            "compressed-tensors >= 0.20 rejects actorder='group' (weight_g_idx) when loading; "
            "vLLM and ferroquant.load read it. Use actorder='static' for the widest support.",
            stacklevel=3,
        )
    try:
        from compressed_tensors import __version__ as ct_version
    except ImportError:  # the package is optional for writing
        ct_version = "0.20.0"
    formats = {g["format"] for g in config_groups.values()}
    return {
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None if kv_cache is None else acts.args_dict(kv_cache),
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": ct_version,
    }


# ---------------------------------------------------------------------------------------------
# Reading.


def _activation_quantizers(files: CheckpointFiles, prefix: str, settings: CTSettings,
                           scheme: GroupScheme, device: torch.device | str) -> list[Any]:
    """The layer's input and output quantizers (None where its group has none)."""
    found: list[Any] = []
    for base, args in (("input", scheme.input_activations), ("output", scheme.output_activations)):
        why = (f"static {base}_activations {args.describe()} of config_groups.{scheme.name} "
               f"from {settings.source}") if args is not None else ""
        found.append(None if args is None else
                     acts.read_quantizer(files, prefix, base, args, (1,), why, device)[0])
    return found


def read_layer(
    files: CheckpointFiles, prefix: str, settings: CTSettings,
    in_features: int | None = None, out_features: int | None = None,
    device: torch.device | str = "cpu",
) -> LayerCodes:
    """One layer's codes in ferroquant's convention (unsigned integer codes, or FP8 codes with
    float32 scales ``[out, 1]`` / ``[1, 1]``), with its activation quantizers (created on
    ``device``)."""
    h = check_layer_header(files, prefix, settings, in_features, out_features)
    assert h.scheme is not None
    args, inp, out, ng, why = h.args, h.in_features, h.out_features, h.n_groups, h.why
    b = int(args.num_bits)
    g_idx = default_g_idx(inp, args.effective_group_size)
    scales = files.get(f"{prefix}.weight_scale").to(torch.float32)
    if h.scheme.format == PACK:
        codes = solver.unpack_ct_weight(files.get(f"{prefix}.weight_packed"), b, inp).to(torch.uint8)
        if args.symmetric:
            zeros = torch.full((out, ng), 1 << (b - 1), dtype=torch.int32)
        else:
            zeros = solver.unpack_ct_zero_point(files.get(f"{prefix}.weight_zero_point"), b, out).to(torch.int32)
        if f"{prefix}.weight_g_idx" in files:
            g_idx = files.get(f"{prefix}.weight_g_idx").to(torch.int32)
            if inp and (int(g_idx.min()) < 0 or int(g_idx.max()) >= ng):
                raise CheckpointError(
                    f"{files.info(prefix + '.weight_g_idx').file}: tensor '{prefix}.weight_g_idx' values "
                    f"outside [0, {ng}) ({why})"
                )
            if args.actorder != "group":
                args = args.model_copy(update={"actorder": "group"})
    elif args.type == "float":
        codes = files.get(f"{prefix}.weight")
        scales = scales.reshape(-1, 1)  # [1] per tensor -> [1, 1]
        zeros = torch.zeros(scales.shape, dtype=torch.int32)
    else:
        # signed int8 codes of any width up to 8 bits (compressed-tensors stores W4A8 so too)
        half = 1 << (b - 1)
        signed = files.get(f"{prefix}.weight").to(torch.int16)
        if signed.numel() and (int(signed.min()) < -half or int(signed.max()) >= half):
            raise CheckpointError(f"{files.info(prefix + '.weight').file}: tensor '{prefix}.weight' "
                                  f"holds values outside [{-half}, {half - 1}] ({why})")
        codes = (signed + half).to(torch.uint8)
        zeros = (torch.full((out, ng), half, dtype=torch.int32) if args.symmetric else
                 files.get(f"{prefix}.weight_zero_point").to(torch.int32) + half)
    bias = files.get(f"{prefix}.bias") if f"{prefix}.bias" in files else None
    inp_q, out_q = _activation_quantizers(files, prefix, settings, h.scheme, device)
    return LayerCodes(codes, scales, zeros, g_idx, args, bias, inp_q, out_q)


def layer_tensor_names(files: CheckpointFiles, prefix: str, settings: CTSettings) -> list[str]:
    """Every checkpoint tensor :func:`read_layer` reads for ``prefix`` (the weights' and the
    activation scales')."""
    names = [f"{prefix}.{s}" for s in (*TENSOR_SUFFIXES, "bias")]
    scheme = settings.scheme_for(prefix)
    if scheme is not None:
        names += [f"{prefix}.{base}_{t}" for base, a in
                  (("input", scheme.input_activations), ("output", scheme.output_activations))
                  if a is not None for t in ("scale", "zero_point")]
    return [n for n in names if n in files]
