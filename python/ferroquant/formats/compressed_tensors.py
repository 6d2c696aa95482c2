"""compressed-tensors ``pack-quantized`` layout, as written by llm-compressor and read by
transformers (with the ``compressed-tensors`` package) and vLLM.

Per quantized Linear ``p`` (``in`` inputs, ``out`` outputs, ``ng`` groups, ``b`` bits):

- ``p.weight_packed`` int32 ``[out, ceil(in*b/32)]``: signed codes ``q - 2**(b-1)`` stored
  shifted back by ``+2**(b-1)`` (so: our unsigned codes), densely bit-packed along each row;
- ``p.weight_scale`` ``[out, ng]`` in the model dtype (``[out, 1]`` per channel);
- ``p.weight_zero_point`` (asymmetric only) int32 ``[ceil(out*b/32), ng]`` packed along dim 0;
- ``p.weight_shape`` int64 ``[2]`` = ``[out, in]``; ``p.weight_g_idx`` int32 ``[in]`` only for
  ``actorder: group``.

Weight = ``weight_scale[o, g] * (q_signed - zp_signed)`` = ``scale * (code - zero)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .. import solver
from ..config import QuantizationArgs, match_specificity, match_target
from .common import CheckpointError, CheckpointFiles, LayerCodes, n_groups_for, recipe_get

TENSOR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


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


def layer_tensors(prefix: str, layer: LayerCodes, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    check_layer(prefix, layer)
    b = layer.bits
    out: dict[str, torch.Tensor] = {
        f"{prefix}.weight_packed": solver.pack_ct_weight(layer.codes.to(torch.uint8).contiguous(), b),
        f"{prefix}.weight_scale": layer.scales.to(scale_dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.args.symmetric:
        out[f"{prefix}.weight_zero_point"] = solver.pack_ct_zero_point(
            layer.zeros.to(torch.uint8).contiguous(), b
        )
    if layer.args.actorder == "group":
        out[f"{prefix}.weight_g_idx"] = layer.g_idx.to(torch.int32).contiguous()
    elif not layer.has_trivial_g_idx():
        raise ValueError(
            f"{prefix}: non-contiguous g_idx but actorder is {layer.args.actorder!r}; "
            "compressed-tensors only stores weight_g_idx for actorder='group'"
        )
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.detach().to(scale_dtype).contiguous()
    return out


def weights_args_dict(args: QuantizationArgs) -> dict[str, Any]:
    """The ``weights`` entry of a config group, as compressed-tensors serialises it."""
    d: dict[str, Any] = {
        "num_bits": int(args.num_bits),
        "type": "int",
        "symmetric": bool(args.symmetric),
        "group_size": None if args.effective_group_size <= 0 else int(args.effective_group_size),
        "strategy": "channel" if args.effective_group_size <= 0 else "group",
        "dynamic": False,
        "observer": args.observer,
    }
    if args.actorder is not None:
        d["actorder"] = args.actorder
    return d


def build_config(
    layers: dict[str, LayerCodes], *, ignore: list[str], recipe: Any,
) -> dict[str, Any]:
    """``quantization_config`` of config.json, with the field names and order compressed-tensors'
    ``ModelCompressor.update_config`` writes."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name, layer in layers.items():
        wa = weights_args_dict(layer.args)
        key = repr(sorted(wa.items()))
        groups.setdefault(key, (wa, []))[1].append(name)
    config_groups: dict[str, Any] = {}
    single = len(groups) == 1
    for i, (wa, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {
            # One scheme: target the class and list the rest in `ignore` (what llm-compressor
            # writes). Several: exact module names, so no two groups can claim a layer.
            "targets": ["Linear"] if single else sorted(names),
            "weights": wa,
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
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
    kv = recipe_get(recipe, "kv_cache_scheme")
    if kv is not None and hasattr(kv, "model_dump"):
        kv = kv.model_dump(mode="json")
    return {
        "config_groups": config_groups,
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": kv,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": ct_version,
    }


# ---------------------------------------------------------------------------------------------
# Reading.


def quantized_prefixes(files: CheckpointFiles) -> list[str]:
    return sorted(n[: -len(".weight_packed")] for n in files.names() if n.endswith(".weight_packed"))


class CTSettings:
    """Resolves each module's weights args from ``config_groups`` targets (exact names,
    ``re:`` regexes, or class names such as ``Linear``) and ``ignore``."""

    def __init__(self, qc: dict[str, Any], source: str) -> None:
        self.source = source
        fmt = qc.get("format")
        if fmt != "pack-quantized":
            raise CheckpointError(
                f"{source}: compressed-tensors format {fmt!r} is not supported (only 'pack-quantized')"
            )
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise CheckpointError(f"{source}: compressed-tensors config has no config_groups")
        self.groups: list[tuple[list[str], QuantizationArgs]] = []
        for gname, g in groups.items():
            if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
                raise CheckpointError(f"{source}: config_groups.{gname} has no 'weights' arguments")
            w = g["weights"]
            if w.get("type", "int") != "int":
                raise CheckpointError(f"{source}: config_groups.{gname}: only int weights are supported")
            strategy = w.get("strategy") or ("channel" if w.get("group_size") in (None, -1) else "group")
            if strategy not in ("group", "channel"):
                raise CheckpointError(f"{source}: config_groups.{gname}: strategy {strategy!r} unsupported")
            actorder = w.get("actorder")
            if actorder in ("weight", "static"):
                actorder = "static"
            elif actorder in ("group", "dynamic", True):
                actorder = "group"
            else:
                actorder = None
            try:
                args = QuantizationArgs(
                    num_bits=int(w.get("num_bits", 8)),
                    symmetric=bool(w.get("symmetric", True)),
                    strategy=strategy,
                    group_size=None if strategy == "channel" else int(w["group_size"]),
                    actorder=actorder,
                    observer="mse" if w.get("observer") == "mse" else "minmax",
                )
            except (KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
                raise CheckpointError(f"{source}: config_groups.{gname}.weights: {e}") from None
            targets = g.get("targets") or []
            self.groups.append((list(targets), args))
        self.ignore = list(qc.get("ignore") or [])

    def for_module(self, name: str, module: Any = "Linear") -> QuantizationArgs | None:
        """The args of the most specific matching group (full name > regex > class name, the
        recipe's own rule: :func:`ferroquant.config.match_specificity`); ``module`` is the module
        or its class name. The first of equally specific groups wins (a reader is lenient)."""
        if any(match_target(name, module, t) for t in self.ignore):
            return None
        best: tuple[int, QuantizationArgs] | None = None
        for targets, args in self.groups:
            spec = max((match_specificity(name, module, t) for t in targets), default=0)
            if spec and (best is None or spec > best[0]):
                best = (spec, args)
        return None if best is None else best[1]


@dataclass
class LayerHeader:
    """One quantized layer's args and shape, checked from the headers (and ``weight_shape``)."""

    args: QuantizationArgs
    in_features: int
    out_features: int
    n_groups: int
    why: str


def check_layer_header(
    files: CheckpointFiles, prefix: str, settings: CTSettings,
    in_features: int | None = None, out_features: int | None = None,
) -> LayerHeader:
    """Check presence, dtypes and shapes of one layer's tensors against the config (and the
    model's layer shape where known); of the data only the 2-integer ``weight_shape`` is read."""
    args = settings.for_module(prefix)
    if args is None:
        raise CheckpointError(
            f"{files.dir}: '{prefix}.weight_packed' exists but no config group in {settings.source} targets '{prefix}'"
        )
    b = int(args.num_bits)
    shp = files.expect(f"{prefix}.weight_shape", (torch.int64, torch.int32), (2,))
    ws = [int(v) for v in files.get(f"{prefix}.weight_shape").tolist()]
    out, inp = ws
    if (out_features is not None and out != out_features) or (in_features is not None and inp != in_features):
        raise CheckpointError(
            f"{shp.file}: tensor '{prefix}.weight_shape' is {ws} but the model's layer is "
            f"[{out_features}, {in_features}]"
        )
    gs = args.effective_group_size
    if gs > 0 and inp % gs:
        raise CheckpointError(
            f"{shp.file}: '{prefix}': in_features={inp} is not a multiple of group_size={gs} from {settings.source}"
        )
    ng = n_groups_for(inp, gs)
    why = f"bits={b}, group_size={gs} from {settings.source}, weight_shape={ws}"
    files.expect(f"{prefix}.weight_packed", torch.int32, (out, -(-inp * b // 32)), why)
    files.expect(f"{prefix}.weight_scale", (torch.float16, torch.bfloat16, torch.float32), (out, ng), why)
    if args.symmetric:
        if f"{prefix}.weight_zero_point" in files:
            raise CheckpointError(
                f"{files.info(prefix + '.weight_zero_point').file}: tensor '{prefix}.weight_zero_point' "
                f"present but {settings.source} says symmetric"
            )
    else:
        files.expect(f"{prefix}.weight_zero_point", torch.int32, (-(-out * b // 32), ng), why)
    if f"{prefix}.weight_g_idx" in files:
        files.expect(f"{prefix}.weight_g_idx", (torch.int32, torch.int64), (inp,), why)
    return LayerHeader(args, inp, out, ng, why)


def read_layer(
    files: CheckpointFiles, prefix: str, settings: CTSettings,
    in_features: int | None = None, out_features: int | None = None,
) -> LayerCodes:
    h = check_layer_header(files, prefix, settings, in_features, out_features)
    args, inp, out, ng, why = h.args, h.in_features, h.out_features, h.n_groups, h.why
    b = int(args.num_bits)
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
    else:
        from .common import default_g_idx

        g_idx = default_g_idx(inp, args.effective_group_size)
    scales = files.get(f"{prefix}.weight_scale").to(torch.float32)
    bias = files.get(f"{prefix}.bias") if f"{prefix}.bias" in files else None
    return LayerCodes(codes, scales, zeros, g_idx, args, bias)
